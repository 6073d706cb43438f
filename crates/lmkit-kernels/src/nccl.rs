//! NCCL, NVIDIA's collective library, opened at run time: data-parallel training sums its GPU
//! gradients with it. Nothing links against it, so a CUDA build runs where it is not installed
//! (the group then sums over TCP); PyTorch's wheels ship it (`nvidia/nccl/lib/libnccl.so.2`),
//! Debian/Ubuntu have `libnccl2`.
//!
//! `LMKIT_NCCL` chooses: unset — the first of [`CANDIDATES`] that loads, if any; `0` or `off` —
//! none; a path — that library, and an error if it does not load.
//!
//! This part needs no GPU: loading, the version and a communicator's unique id (the 128 bytes
//! that rank 0 makes and sends every member through another channel). The communicator and the
//! all-reduce on device buffers are in `cuda::Comm` (feature `cuda`).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// Libraries tried, in order, when `LMKIT_NCCL` is not set (found through the loader's path:
/// `LD_LIBRARY_PATH`, the system's library directories).
pub const CANDIDATES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// `ncclUniqueId`: what every member of a communicator needs from rank 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [u8; 128],
}

pub(crate) type NcclComm = *mut c_void;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
pub(crate) type CommInitRank = unsafe extern "C" fn(*mut NcclComm, c_int, UniqueId, c_int) -> c_int;
pub(crate) type CommDestroy = unsafe extern "C" fn(NcclComm) -> c_int;
pub(crate) type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    NcclComm,
    *mut c_void,
) -> c_int;
pub(crate) type GroupCall = unsafe extern "C" fn() -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type LastError = unsafe extern "C" fn(NcclComm) -> *const c_char;

/// `ncclFloat32`, `ncclAvg`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const FLOAT32: c_int = 7;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) const AVG: c_int = 4;

/// The loaded library's entry points (the communicator's are used by `cuda::Comm`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct Nccl {
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    pub(crate) comm_init_rank: CommInitRank,
    pub(crate) comm_destroy: CommDestroy,
    /// `ncclCommAbort` (NCCL 2.4 and later): ends a communicator without waiting for its
    /// operations in flight (a member that left leaves the others' all-reduce waiting for ever).
    pub(crate) comm_abort: Option<CommDestroy>,
    pub(crate) all_reduce: AllReduce,
    pub(crate) group_start: GroupCall,
    pub(crate) group_end: GroupCall,
    error_string: ErrorString,
    last_error: Option<LastError>,
    path: String,
    // Keeps the library mapped while the function pointers above are used (for the process's
    // life: the loaded library is kept in a static).
    _lib: libloading::Library,
}

fn open(path: &str) -> Result<Nccl, String> {
    // SAFETY: loading a shared library runs its initialisers; the symbols are declared with the
    // signatures of nccl.h (2.x: stable across its releases).
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get(concat!($name, "\0").as_bytes())
                    .map_err(|e| format!("{path}: {e}"))?
            };
        }
        let last_error = lib.get::<LastError>(b"ncclGetLastError\0").ok().map(|f| *f);
        let comm_abort = lib.get::<CommDestroy>(b"ncclCommAbort\0").ok().map(|f| *f);
        Ok(Nccl {
            get_version: sym!("ncclGetVersion"),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort,
            all_reduce: sym!("ncclAllReduce"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            error_string: sym!("ncclGetErrorString"),
            last_error,
            path: path.to_string(),
            _lib: lib,
        })
    }
}

/// What `LMKIT_NCCL` asks for.
enum Choice {
    Off,
    Auto,
    Path(String),
}

fn choice() -> Choice {
    match std::env::var("LMKIT_NCCL") {
        Err(_) => Choice::Auto,
        Ok(v) if v.trim().is_empty() => Choice::Auto,
        Ok(v) if matches!(v.trim(), "0" | "off" | "none") => Choice::Off,
        Ok(v) => Choice::Path(v.trim().to_string()),
    }
}

/// The library `LMKIT_NCCL` chooses (loaded once per process): `Ok(None)` when it is turned off
/// or, unset, when none of [`CANDIDATES`] loads; an error when a path is named and fails.
pub fn library() -> Result<Option<&'static Nccl>, String> {
    static LOADED: OnceLock<Result<Option<Nccl>, String>> = OnceLock::new();
    let loaded = LOADED.get_or_init(|| match choice() {
        Choice::Off => Ok(None),
        Choice::Auto => Ok(CANDIDATES.iter().find_map(|c| open(c).ok())),
        Choice::Path(p) => open(&p).map(Some).map_err(|e| {
            format!("LMKIT_NCCL={p}: {e} (name NCCL's libnccl.so.2, or set LMKIT_NCCL=0 to sum gradients over TCP)")
        }),
    });
    match loaded {
        Ok(n) => Ok(n.as_ref()),
        Err(e) => Err(e.clone()),
    }
}

impl Nccl {
    /// Where the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The library's version as (major, minor, patch).
    pub fn version(&self) -> Result<(i32, i32, i32), String> {
        let mut v: c_int = 0;
        // SAFETY: the function writes one int.
        self.check(unsafe { (self.get_version)(&mut v) }, None)?;
        // Since 2.9: major * 10000 + minor * 100 + patch.
        Ok((v / 10000, v / 100 % 100, v % 100))
    }

    /// A new communicator's id (rank 0 makes it; every member passes it to `cuda::Comm::new`).
    pub fn unique_id(&self) -> Result<UniqueId, String> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: the function writes the 128-byte id.
        self.check(unsafe { (self.get_unique_id)(&mut id) }, None)?;
        Ok(id)
    }

    /// `Ok` for ncclSuccess, else NCCL's message (and its last error on `comm`, where it has one).
    pub(crate) fn check(&self, code: c_int, comm: Option<NcclComm>) -> Result<(), String> {
        if code == 0 {
            return Ok(());
        }
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: NCCL returns NUL-terminated static strings.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        // SAFETY: both take a code / a communicator (or null) and return a string.
        let what = text(unsafe { (self.error_string)(code) });
        let last = self
            .last_error
            .map(|f| text(unsafe { f(comm.unwrap_or(std::ptr::null_mut())) }))
            .filter(|s| !s.is_empty());
        Err(match last {
            Some(l) => format!("NCCL error {code} ({what}): {l}"),
            None => format!("NCCL error {code} ({what})"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The library the test suite names in `LMKIT_NCCL` (the parity venv's PyTorch ships one);
    /// without it these tests have nothing to load and pass only when it is not required.
    fn loaded() -> Option<&'static Nccl> {
        let required = std::env::var("LMKIT_REQUIRE_NCCL").is_ok_and(|v| v == "1");
        match library() {
            Ok(Some(n)) => Some(n),
            Ok(None) if !required => None,
            other => panic!("LMKIT_REQUIRE_NCCL=1 but no NCCL: {:?}", other.err()),
        }
    }

    #[test]
    fn nccl_loads_and_makes_unique_ids() {
        let Some(n) = loaded() else { return };
        let (major, minor, _) = n.version().unwrap();
        assert_eq!(major, 2, "{}", n.path());
        assert!(minor >= 10, "ncclAvg needs NCCL 2.10 or later");
        assert!(
            n.comm_abort.is_some(),
            "ncclCommAbort is in every NCCL since 2.4"
        );
        let a = n.unique_id().unwrap();
        let b = n.unique_id().unwrap();
        assert!(a.internal.iter().any(|&x| x != 0));
        assert!(a.internal != b.internal, "two communicators, two ids");
    }

    #[test]
    fn nccl_errors_are_named() {
        let Some(n) = loaded() else { return };
        // ncclInvalidArgument.
        let e = n.check(4, None).unwrap_err();
        assert!(e.starts_with("NCCL error 4 ("), "{e}");
        assert!(e.to_lowercase().contains("invalid"), "{e}");
        assert!(open("/nonexistent/libnccl.so.2").is_err());
    }
}
