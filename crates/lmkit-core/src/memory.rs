//! How much memory the machine can give a run, to refuse one that cannot fit before it
//! allocates (an allocation failure aborts the process).

use std::path::{Path, PathBuf};

/// Bytes available to a new allocation without swapping: the least of Linux's `MemAvailable`,
/// the room under the memory limit of the process's control group (a container's limit: cgroup
/// v2 `memory.max` or v1 `memory.limit_in_bytes`, of its group and each group above it; what the
/// group holds counted without the page cache it can drop), and the room under the process's
/// address-space limit (`ulimit -v`). `None` where none of them can be read.
pub fn available() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    [
        mem_available(),
        cgroup_room(&cgroup, Path::new("/sys/fs/cgroup")),
        address_space_room(&limits, &status),
    ]
    .into_iter()
    .flatten()
    .min()
}

/// Linux's `MemAvailable`, in bytes.
fn mem_available() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// The bytes of a `NAME:  N kB` line of a `/proc` file's `text` (`/proc/meminfo`,
/// `/proc/self/status`).
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A file holding one number ("max", a v2 group without a limit, is none).
fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `field` in a `memory.stat` file.
fn stat_field(path: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (name, value) = l.split_once(' ')?;
        (name == field).then(|| value.trim().parse().ok())?
    })
}

/// The least room under the memory limits of the control groups that `cgroup` (the text of
/// `/proc/self/cgroup`) names, mounted below `root`: for the process's own group and each one
/// above it, the limit less the memory used but its inactive page cache.
fn cgroup_room(cgroup: &str, root: &Path) -> Option<u64> {
    let mut least: Option<u64> = None;
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (base, limit, usage, cache): (PathBuf, _, _, _) = if controllers.is_empty() {
            (root.into(), "memory.max", "memory.current", "inactive_file")
        } else if controllers.split(',').any(|c| c == "memory") {
            (
                root.join("memory"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
            )
        } else {
            continue;
        };
        let mut dir = base.join(path.trim_start_matches('/'));
        loop {
            if let (Some(max), Some(used)) =
                (read_number(&dir.join(limit)), read_number(&dir.join(usage)))
            {
                let cached = stat_field(&dir.join("memory.stat"), cache).unwrap_or(0);
                let room = max.saturating_sub(used.saturating_sub(cached));
                least = Some(least.map_or(room, |l| l.min(room)));
            }
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    least
}

/// The room under the address-space limit that `limits` (the text of `/proc/self/limits`) sets,
/// less the address space in use (`VmSize` in `status`, the text of `/proc/self/status`).
fn address_space_room(limits: &str, status: &str) -> Option<u64> {
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max address space"))?
        .split_whitespace()
        .next()?;
    let limit: u64 = soft.parse().ok()?; // "unlimited" is no limit
    Some(limit.saturating_sub(kib_field(status, "VmSize:")?))
}

/// `bytes` as GiB with two decimals, for messages.
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container's limit (cgroup v2 and v1, at the process's group or one above it) and an
    /// address-space limit bound what is available; page cache the group can drop is not
    /// counted as used.
    #[test]
    fn control_group_and_address_space_limits_bound_what_is_available() {
        let root = tempfile::tempdir().unwrap();
        let write = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        // v2: the group has no limit of its own ("max"), its parent 4 GiB with 3 GiB used of
        // which 1 GiB is inactive page cache.
        write("kube/pod/memory.max", "max\n");
        write("kube/pod/memory.current", "1073741824\n");
        write("kube/memory.max", "4294967296\n");
        write("kube/memory.current", "3221225472\n");
        write(
            "kube/memory.stat",
            "anon 1\ninactive_file 1073741824\nactive_file 5\n",
        );
        let v2 = "0::/kube/pod\n";
        assert_eq!(cgroup_room(v2, root.path()), Some(2 << 30));
        // v1: the memory controller's own hierarchy; an unlimited group gives its usage back.
        write("memory/job/memory.limit_in_bytes", "1073741824\n");
        write("memory/job/memory.usage_in_bytes", "536870912\n");
        write(
            "memory/job/memory.stat",
            "cache 9\ntotal_inactive_file 268435456\n",
        );
        write("memory/memory.limit_in_bytes", "9223372036854771712\n");
        write("memory/memory.usage_in_bytes", "1\n");
        let v1 = "5:cpu,cpuacct:/job\n4:memory:/job\n0::/\n";
        assert_eq!(cgroup_room(v1, root.path()), Some(768 << 20));
        assert_eq!(
            cgroup_room("4:memory:/gone\n", root.path()),
            Some(9223372036854771711)
        );
        assert_eq!(cgroup_room("", root.path()), None);
        let limits = "Limit Soft Limit Hard Limit Units\n\
                      Max address space         4294967296           unlimited            bytes\n";
        let status = "Name: x\nVmSize:\t 1048576 kB\n";
        assert_eq!(address_space_room(limits, status), Some(3 << 30));
        let unlimited =
            "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_room(unlimited, status), None);
    }

    #[test]
    fn reads_a_plausible_amount_on_linux() {
        if cfg!(target_os = "linux") {
            let a = available().expect("MemAvailable");
            assert!(a > 1 << 20, "{a}");
        }
        assert_eq!(gib(1.5 * (1u64 << 30) as f64), "1.50 GiB");
    }
}
