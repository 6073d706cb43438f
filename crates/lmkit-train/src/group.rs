//! Data-parallel training: a group of processes (one per GPU, or several on CPUs) that each train
//! on their own share of every batch and sum their gradients before each optimizer step, so every
//! process applies the same update and holds the same weights.
//!
//! A group is described by torchrun's environment variables: `WORLD_SIZE` processes, this one's
//! `RANK` (0 is the root, the only one that writes metrics and checkpoints), `LOCAL_RANK` (its GPU
//! on this machine) and the root's `MASTER_ADDR`:`MASTER_PORT`. `lmkit train --procs N` starts
//! such a group on one machine; on several machines, start one `lmkit train` per process with
//! those variables set (by torchrun, Slurm's srun, mpirun or by hand).
//!
//! The sum is made over TCP by the root: it reads every peer's buffer in rank order, adds them
//! in that order (the same result on every run) and sends the sum back. This is the CPU path and
//! the reference for the GPU collective: where every member trains on a GPU and NCCL loads
//! ([`lmkit_kernels::nccl`]), [`Group::join_gpus`] makes an NCCL communicator (rank 0's id sent
//! over TCP) and the gradients are averaged on the GPUs, without a trip through the CPU.

use crate::error::{Result, TrainError};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 4] = b"LMKG";

/// Values converted to or from bytes at a time in an exchange.
const CHUNK: usize = 1 << 16;

/// How long the members of a group wait for each other.
#[derive(Clone, Copy, Debug)]
struct Waits {
    /// For every member to join (`None`: for ever).
    join: Option<Duration>,
    /// For a new connection to MASTER_PORT to say it is a member (anything else that connects —
    /// a port scan, a health check, another program — is closed and the root goes on waiting).
    hello: Duration,
    /// Once the group is formed, for a member's part of an exchange (`None`: for ever): a member
    /// that hangs, or whose machine is cut off without closing its connection, stops the run with
    /// an error naming it instead of holding the others for ever (as torch.distributed's timeout).
    exchange: Option<Duration>,
}

impl Waits {
    const DEFAULT: Waits = Waits {
        join: Some(Duration::from_secs(300)),
        hello: Duration::from_secs(10),
        exchange: Some(Duration::from_secs(1800)),
    };

    /// The defaults, or the join's and the exchange's waits from `LMKIT_GROUP_TIMEOUT` (seconds;
    /// 0: for ever), as torch.distributed's one timeout covers its rendezvous and collectives.
    fn from_env() -> Result<Waits> {
        Ok(Waits::from_setting(var(TIMEOUT_VAR)?))
    }

    /// [`Waits::from_env`] of the variable's value.
    fn from_setting(seconds: Option<usize>) -> Waits {
        match seconds {
            None => Waits::DEFAULT,
            Some(0) => Waits {
                join: None,
                exchange: None,
                ..Waits::DEFAULT
            },
            Some(s) => Waits {
                join: Some(Duration::from_secs(s as u64)),
                exchange: Some(Duration::from_secs(s as u64)),
                ..Waits::DEFAULT
            },
        }
    }

    /// Whether the wait to join, begun at `start`, is over.
    fn join_over(&self, start: Instant) -> bool {
        self.join.is_some_and(|limit| start.elapsed() > limit)
    }

    /// The wait to join in seconds, for messages (given only once it is over, so never for ever).
    fn join_secs(&self) -> u64 {
        self.join.map_or(u64::MAX, |d| d.as_secs())
    }
}

/// Names the seconds a member waits for another's part of an exchange.
const TIMEOUT_VAR: &str = "LMKIT_GROUP_TIMEOUT";

/// The most members a group takes: the root keeps a connection to every other member (one file
/// descriptor each) and sums their buffers in turn.
pub const MAX_WORLD: usize = 4096;

/// This process's place in its training group.
pub struct Group {
    rank: usize,
    world: usize,
    link: Link,
    /// How long an exchange waits for a member (for the errors that say it waited).
    exchange: Option<Duration>,
    /// How long joining waits: also the NCCL communicator's forming.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    join: Option<Duration>,
    /// The members' NCCL communicator, once [`Group::join_gpus`] has made one.
    #[cfg(feature = "cuda")]
    gpus: Option<lmkit_kernels::cuda::Comm>,
}

enum Link {
    Single,
    /// The root's connections to ranks 1.. (in rank order).
    Root(Vec<Conn>),
    Peer(Conn),
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

fn group_err(msg: impl Into<String>) -> TrainError {
    TrainError::Group(msg.into())
}

/// I/O errors of the group's connections as group errors.
trait Net<T> {
    fn net(self) -> Result<T>;
}

impl<T> Net<T> for std::io::Result<T> {
    fn net(self) -> Result<T> {
        self.map_err(|e| TrainError::Group(e.to_string()))
    }
}

fn var(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| group_err(format!("{name}={v} is not a whole number"))),
        Err(_) => Ok(None),
    }
}

/// Worker threads for each of `local` group members on a machine of `cores` cores: the cores
/// shared out, at least one each.
fn shared_threads(cores: usize, local: usize) -> usize {
    (cores / local.max(1)).max(1)
}

/// Where `LOCAL_WORLD_SIZE` (set by torchrun and by `lmkit train --procs`) says that this is one
/// of several group members on this machine and `RAYON_NUM_THREADS` is not set: the machine's
/// cores shared out among them as this process's worker threads, so that N members do not each
/// start a thread per core and take turns on them. Call before anything runs on the worker
/// threads; returns the threads set (`None`: nothing changed).
pub fn share_cores() -> Result<Option<usize>> {
    let Some(local) = var("LOCAL_WORLD_SIZE")? else {
        return Ok(None);
    };
    if local < 2 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return Ok(None);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = shared_threads(cores, local);
    Ok(rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .ok()
        .map(|()| threads))
}

impl Group {
    /// A group of one: nothing is exchanged.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world: 1,
            link: Link::Single,
            exchange: None,
            join: None,
            #[cfg(feature = "cuda")]
            gpus: None,
        }
    }

    /// The group described by `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (a group
    /// of one when `WORLD_SIZE` is unset or 1), its members waiting for each other to join and
    /// then for each other's part of an exchange at most `LMKIT_GROUP_TIMEOUT` seconds (unset:
    /// 300 to join, 1800 an exchange; 0: for ever).
    /// `fingerprint` identifies the run (its configuration): processes of different runs refuse
    /// to form a group.
    pub fn from_env(fingerprint: u64) -> Result<Group> {
        let world = var("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(Group::single());
        }
        let rank = var("RANK")?.ok_or_else(|| group_err("WORLD_SIZE is set but RANK is not"))?;
        let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = var("MASTER_PORT")?
            .ok_or_else(|| group_err("WORLD_SIZE is set but MASTER_PORT is not"))?;
        let port = u16::try_from(port)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| group_err(format!("MASTER_PORT={port} is not a port (1 to 65535)")))?;
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| group_err(format!("MASTER_ADDR {host}:{port}: {e}")))?
            .next()
            .ok_or_else(|| group_err(format!("MASTER_ADDR {host} has no address")))?;
        Group::join_within(rank, world, addr, fingerprint, Waits::from_env()?)
    }

    /// Joins (rank > 0) or gathers (rank 0) the group of `world` processes at `addr`, with the
    /// default waits.
    pub fn join(rank: usize, world: usize, addr: SocketAddr, fingerprint: u64) -> Result<Group> {
        Group::join_within(rank, world, addr, fingerprint, Waits::DEFAULT)
    }

    fn join_within(
        rank: usize,
        world: usize,
        addr: SocketAddr,
        fingerprint: u64,
        waits: Waits,
    ) -> Result<Group> {
        if world > MAX_WORLD {
            return Err(group_err(format!(
                "WORLD_SIZE {world} is more than a group takes ({MAX_WORLD} processes)"
            )));
        }
        if rank >= world {
            return Err(group_err(format!(
                "RANK {rank} is not below WORLD_SIZE {world}"
            )));
        }
        let link = if rank == 0 {
            let listener = TcpListener::bind(addr)
                .map_err(|e| group_err(format!("rank 0 cannot listen on {addr}: {e}")))?;
            listener.set_nonblocking(true).net()?;
            let mut peers: Vec<Option<Conn>> = (1..world).map(|_| None).collect();
            // Connections that did not greet as a member, closed.
            let mut strangers = 0;
            let start = Instant::now();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).net()?;
                        stream.set_read_timeout(Some(waits.hello)).net()?;
                        let mut conn = Conn::new(stream)?;
                        let Some((r, w, f)) = conn.read_hello() else {
                            strangers += 1;
                            continue;
                        };
                        if w != world || f != fingerprint || r == 0 || r >= world {
                            return Err(group_err(format!(
                                "a process with RANK {r}, WORLD_SIZE {w} and another run's \
                                 configuration tried to join (expected WORLD_SIZE {world} and \
                                 the same config)"
                            )));
                        }
                        if peers[r - 1].is_some() {
                            return Err(group_err(format!("two processes have RANK {r}")));
                        }
                        // The answer tells the member it reached a group's root.
                        conn.write_answer()
                            .map_err(|e| group_err(format!("rank {r} left while joining: {e}")))?;
                        peers[r - 1] = Some(conn);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if waits.join_over(start) {
                            let missing: Vec<String> = peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            let others = match strangers {
                                0 => String::new(),
                                n => format!(
                                    " ({n} other connection(s) to {addr} did not greet as a \
                                     member and were closed: is MASTER_PORT another program's?)"
                                ),
                            };
                            return Err(group_err(format!(
                                "ranks {} did not join within {} s{others} ({TIMEOUT_VAR} sets \
                                 the wait in seconds)",
                                missing.join(", "),
                                waits.join_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(group_err(e.to_string())),
                }
            }
            Link::Root(peers.into_iter().flatten().collect())
        } else {
            let start = Instant::now();
            let stream = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => break s,
                    Err(e) if waits.join_over(start) => {
                        return Err(group_err(format!(
                            "rank {rank} could not reach rank 0 at {addr} within {} s \
                             ({TIMEOUT_VAR} sets the wait in seconds): {e}",
                            waits.join_secs()
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            stream.set_read_timeout(waits.join).net()?;
            let mut conn = Conn::new(stream)?;
            conn.write_hello(rank, world, fingerprint).net()?;
            if !conn.read_answer() {
                let silent = match waits.join {
                    Some(d) => format!(", or said nothing for {} s", d.as_secs()),
                    None => String::new(),
                };
                return Err(group_err(format!(
                    "{addr} (MASTER_ADDR:MASTER_PORT) did not answer as the root of an lmkit \
                     training group (it closed the connection or answered something \
                     else{silent}): is the port another program's, or rank 0 another run's?"
                )));
            }
            Link::Peer(conn)
        };
        let conns = match &link {
            Link::Single => &[][..],
            Link::Root(peers) => &peers[..],
            Link::Peer(conn) => std::slice::from_ref(conn),
        };
        for conn in conns {
            let stream = conn.writer.get_ref();
            stream.set_read_timeout(waits.exchange).net()?;
            stream.set_write_timeout(waits.exchange).net()?;
        }
        Ok(Group {
            rank,
            world,
            link,
            exchange: waits.exchange,
            join: waits.join,
            #[cfg(feature = "cuda")]
            gpus: None,
        })
    }

    /// The error for an exchange with rank `member` that failed with `e`: it left (its
    /// connection closed or broke) or kept silent past the exchange's wait.
    ///
    /// The NCCL communicator, if any, is aborted: the gradients' all-reduce queued before this
    /// exchange may wait for the lost member for ever, and so would destroying it.
    fn lost(&mut self, member: usize, e: std::io::Error) -> TrainError {
        #[cfg(feature = "cuda")]
        if let Some(comm) = self.gpus.take() {
            comm.abort();
        }
        let silent = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        match self.exchange {
            Some(wait) if silent => group_err(format!(
                "rank {member} did not take part in an exchange for {} s (stuck, or its machine \
                 unreachable; {TIMEOUT_VAR} sets the wait in seconds, 0 for ever); this run stops",
                wait.as_secs_f64()
            )),
            _ => group_err(format!(
                "rank {member} left the group ({e}); this run stops"
            )),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Rank 0: the process that writes the run's files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Replaces `data` on every member by rank 0's.
    pub fn broadcast(&mut self, data: &mut [u8]) -> Result<()> {
        let failed = match &mut self.link {
            Link::Single => return Ok(()),
            Link::Peer(conn) => conn.read_bytes(data).err().map(|e| (0, e)),
            Link::Root(peers) => peers
                .iter_mut()
                .enumerate()
                .find_map(|(i, conn)| conn.write_bytes(data).err().map(|e| (i + 1, e))),
        };
        match failed {
            None => Ok(()),
            Some((member, e)) => Err(self.lost(member, e)),
        }
    }

    /// Where every member trains on a CUDA device and has NCCL (see [`lmkit_kernels::nccl`]):
    /// makes the group's NCCL communicator, so that gradients are averaged on the GPUs. Returns
    /// what the group uses, for the log. Every member must call it (it exchanges over TCP).
    pub fn join_gpus(&mut self, device: &candle_core::Device) -> Result<Option<String>> {
        if self.world <= 1 || !device.is_cuda() {
            return Ok(None);
        }
        let nccl = lmkit_kernels::nccl::library();
        let usable = matches!(nccl, Ok(Some(_))) && cfg!(feature = "cuda");
        let mut count = [usable as u8 as f32];
        self.all_reduce_sum(&mut count)?;
        let nccl = nccl.map_err(group_err)?;
        let tcp = "gradients are summed over TCP through the CPU";
        let Some(nccl) = nccl.filter(|_| count[0] as usize == self.world) else {
            return Ok(Some(if usable {
                format!("not every member has NCCL: {tcp}")
            } else {
                format!(
                    "NCCL is not loaded (LMKIT_NCCL=0, or no libnccl.so.2 on the library path): {tcp}"
                )
            }));
        };
        self.nccl_communicator(nccl, device)?;
        let (major, minor, patch) = nccl.version().map_err(group_err)?;
        Ok(Some(format!(
            "gradients averaged on the GPUs by NCCL {major}.{minor}.{patch} ({})",
            nccl.path()
        )))
    }

    #[cfg(feature = "cuda")]
    fn nccl_communicator(
        &mut self,
        nccl: &'static lmkit_kernels::nccl::Nccl,
        device: &candle_core::Device,
    ) -> Result<()> {
        let mut id = if self.is_root() {
            nccl.unique_id().map_err(group_err)?
        } else {
            lmkit_kernels::nccl::UniqueId { internal: [0; 128] }
        };
        self.broadcast(&mut id.internal)?;
        let (rank, world) = (self.rank, self.world);
        // NCCL's init blocks until every member has joined, and cannot be interrupted: a member
        // that stopped after the id reached it, or machines NCCL cannot connect, would hold this
        // process for ever.
        let comm = within(
            self.join,
            || lmkit_kernels::cuda::Comm::new(nccl, device, id, rank, world),
            move |wait| {
                eprintln!(
                    "error: rank {rank} of {world}: the NCCL communicator was not formed within \
                     {} s (a member stopped after it got rank 0's id, or NCCL cannot connect the \
                     members: NCCL_DEBUG=INFO shows why, NCCL_SOCKET_IFNAME names the network; \
                     {TIMEOUT_VAR} sets the wait in seconds); this process stops",
                    wait.as_secs()
                );
                std::process::exit(1);
            },
        )
        .map_err(|e| group_err(e.to_string()))?;
        self.gpus = Some(comm);
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn nccl_communicator(
        &mut self,
        _: &'static lmkit_kernels::nccl::Nccl,
        _: &candle_core::Device,
    ) -> Result<()> {
        Err(group_err("NCCL needs a build with the cuda feature"))
    }

    /// A group of one with an NCCL communicator (of one member) on `device`: the GPU tests'
    /// way through the NCCL path where only one GPU is lent.
    #[cfg(all(test, feature = "cuda"))]
    pub(crate) fn single_with_nccl(device: &candle_core::Device) -> Result<Group> {
        let nccl = lmkit_kernels::nccl::library()
            .map_err(group_err)?
            .ok_or_else(|| group_err("no NCCL (libnccl.so.2 on LD_LIBRARY_PATH or LMKIT_NCCL)"))?;
        let mut g = Group::single();
        g.nccl_communicator(nccl, device)?;
        Ok(g)
    }

    /// The group's NCCL communicator, if [`Group::join_gpus`] made one.
    #[cfg(feature = "cuda")]
    pub fn gpus(&self) -> Option<&lmkit_kernels::cuda::Comm> {
        self.gpus.as_ref()
    }

    /// Replaces `data` on every member by the element-wise sum over the group, added in rank
    /// order (the same on every member and every run).
    pub fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let failed = match &mut self.link {
            Link::Single => return Ok(()),
            Link::Peer(conn) => conn
                .write_f32s(data)
                .and_then(|()| conn.read_f32s(data))
                .err()
                .map(|e| (0, e)),
            Link::Root(peers) => Self::sum_at_root(peers, data).err(),
        };
        match failed {
            None => Ok(()),
            Some((member, e)) => Err(self.lost(member, e)),
        }
    }

    /// The root's part of [`Group::all_reduce_sum`]: every peer's values added to `data` in
    /// rank order, the sum sent back; a failure names the rank it was exchanging with.
    fn sum_at_root(
        peers: &mut [Conn],
        data: &mut [f32],
    ) -> std::result::Result<(), (usize, std::io::Error)> {
        let mut buf = vec![0f32; data.len()];
        for (i, conn) in peers.iter_mut().enumerate() {
            conn.read_f32s(&mut buf).map_err(|e| (i + 1, e))?;
            for (d, b) in data.iter_mut().zip(&buf) {
                *d += b;
            }
        }
        for (i, conn) in peers.iter_mut().enumerate() {
            conn.write_f32s(data).map_err(|e| (i + 1, e))?;
        }
        Ok(())
    }
}

/// `work()` on this thread; if it has not returned within `wait` (`None`: no limit),
/// `expire(wait)` runs on a watchdog thread, for work that cannot be interrupted (it may end
/// the process). Once `work` returns the watchdog stops without running `expire`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn within<T>(
    wait: Option<Duration>,
    work: impl FnOnce() -> T,
    expire: impl FnOnce(Duration) + Send + 'static,
) -> T {
    let Some(wait) = wait else {
        return work();
    };
    let (done, watched) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = watched.recv_timeout(wait) {
            expire(wait);
        }
    });
    let out = work();
    drop(done);
    let _ = watchdog.join();
    out
}

impl Conn {
    fn new(stream: TcpStream) -> Result<Conn> {
        stream.set_nodelay(true).net()?;
        Ok(Conn {
            reader: BufReader::with_capacity(1 << 20, stream.try_clone().net()?),
            writer: BufWriter::with_capacity(1 << 20, stream),
        })
    }

    fn write_hello(&mut self, rank: usize, world: usize, fingerprint: u64) -> std::io::Result<()> {
        self.writer.write_all(MAGIC)?;
        for v in [rank as u64, world as u64, fingerprint] {
            self.writer.write_all(&v.to_le_bytes())?;
        }
        self.writer.flush()
    }

    /// The root's answer to a member's greeting.
    fn write_answer(&mut self) -> std::io::Result<()> {
        self.writer.write_all(MAGIC)?;
        self.writer.flush()
    }

    /// Whether the root answered the greeting (before the connection's read timeout).
    fn read_answer(&mut self) -> bool {
        let mut m = [0u8; 4];
        self.reader.read_exact(&mut m).is_ok() && &m == MAGIC
    }

    /// A member's greeting: (rank, world, fingerprint); `None` where the connection closed,
    /// kept silent past its read timeout or sent something else.
    fn read_hello(&mut self) -> Option<(usize, usize, u64)> {
        let mut m = [0u8; 4];
        self.reader.read_exact(&mut m).ok()?;
        if &m != MAGIC {
            return None;
        }
        let mut w = [0u8; 8];
        let mut next = || -> Option<u64> {
            self.reader.read_exact(&mut w).ok()?;
            Some(u64::from_le_bytes(w))
        };
        Some((next()? as usize, next()? as usize, next()?))
    }

    fn write_f32s(&mut self, data: &[f32]) -> std::io::Result<()> {
        self.writer.write_all(&(data.len() as u64).to_le_bytes())?;
        let mut bytes = vec![0u8; 4 * CHUNK];
        for chunk in data.chunks(CHUNK) {
            let b = &mut bytes[..chunk.len() * 4];
            for (o, v) in b.chunks_exact_mut(4).zip(chunk) {
                o.copy_from_slice(&v.to_le_bytes());
            }
            self.writer.write_all(b)?;
        }
        self.writer.flush()
    }

    fn write_bytes(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(&(data.len() as u64).to_le_bytes())?;
        self.writer.write_all(data)?;
        self.writer.flush()
    }

    /// Reads a message's length and checks it is `expected`.
    fn read_len(&mut self, expected: usize) -> std::io::Result<()> {
        let mut n = [0u8; 8];
        self.reader.read_exact(&mut n)?;
        let n = u64::from_le_bytes(n);
        if n != expected as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{n} values sent where {expected} were expected (the members train different models)"
                ),
            ));
        }
        Ok(())
    }

    fn read_bytes(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        self.read_len(out.len())?;
        self.reader.read_exact(out)
    }

    fn read_f32s(&mut self, out: &mut [f32]) -> std::io::Result<()> {
        self.read_len(out.len())?;
        let mut bytes = vec![0u8; 4 * CHUNK];
        for chunk in out.chunks_mut(CHUNK) {
            let b = &mut bytes[..chunk.len() * 4];
            self.reader.read_exact(b)?;
            for (o, c) in chunk.iter_mut().zip(b.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Runs `member` as each of the `world` members of a group (one thread each, joined with
    /// `fingerprint`) and returns their results in rank order.
    fn in_group<T: Send + 'static>(
        world: usize,
        fingerprint: u64,
        member: fn(Group) -> T,
    ) -> Vec<T> {
        let addr = free_addr();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                std::thread::spawn(move || {
                    member(Group::join(rank, world, addr, fingerprint).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn members_on_one_machine_share_its_cores() {
        assert_eq!(shared_threads(2, 2), 1);
        assert_eq!(shared_threads(16, 3), 5);
        assert_eq!(shared_threads(16, 4), 4);
        // More members than cores: one thread each, not none.
        assert_eq!(shared_threads(2, 4), 1);
        assert_eq!(shared_threads(8, 0), 8);
    }

    /// Work that cannot be interrupted (NCCL's init) gets a watchdog: past the wait it runs the
    /// expiry (which ends the process there), and not at all once the work is done in time.
    #[test]
    fn within_runs_the_expiry_only_past_the_wait() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let expired = Arc::new(AtomicU64::new(0));
        let e = expired.clone();
        let wait = Duration::from_millis(50);
        let out = within(
            Some(wait),
            || {
                std::thread::sleep(Duration::from_millis(400));
                7
            },
            move |w| e.store(w.as_millis() as u64, Ordering::SeqCst),
        );
        assert_eq!(out, 7);
        assert_eq!(
            expired.load(Ordering::SeqCst),
            50,
            "the slow work's expiry ran"
        );

        let expired = Arc::new(AtomicU64::new(0));
        for wait in [Some(Duration::from_secs(30)), None] {
            let e = expired.clone();
            let start = Instant::now();
            let out = within(wait, || 8, move |_| e.store(1, Ordering::SeqCst));
            assert_eq!(out, 8);
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "returns when the work does"
            );
        }
        assert_eq!(
            expired.load(Ordering::SeqCst),
            0,
            "no expiry for work done in time"
        );
    }

    /// Rank 0's bytes reach every member (how the NCCL communicator's id travels).
    #[test]
    fn broadcast_sends_rank_0s_bytes() {
        let got = in_group(3, 7, |mut g| {
            let mut id = [g.rank() as u8; 128];
            if g.is_root() {
                id[5] = 99;
            }
            g.broadcast(&mut id).unwrap();
            // The group goes on after it.
            let mut x = [1.0f32];
            g.all_reduce_sum(&mut x).unwrap();
            (id, x[0])
        });
        let mut want = [0u8; 128];
        want[5] = 99;
        assert_eq!(got, vec![(want, 3.0); 3]);
        let mut g = Group::single();
        let mut one = [4u8];
        g.broadcast(&mut one).unwrap();
        assert_eq!(one, [4]);
    }

    /// Members on CPUs never make a GPU communicator, and exchange nothing for it.
    #[test]
    fn cpu_groups_have_no_gpu_collective() {
        let got = in_group(2, 8, |mut g| {
            let joined = g.join_gpus(&candle_core::Device::Cpu).unwrap();
            let mut x = [g.rank() as f32];
            g.all_reduce_sum(&mut x).unwrap();
            (joined, x[0])
        });
        assert_eq!(got, vec![(None, 1.0); 2]);
    }

    /// Three members in threads: each gets the sum, added in rank order.
    #[test]
    fn all_reduce_sums_in_rank_order() {
        let ranks = in_group(3, 42, |mut g| {
            let rank = g.rank();
            assert_eq!((g.world(), g.is_root()), (3, rank == 0));
            let mut x = vec![1e8f32, 1.0, rank as f32];
            if rank == 0 {
                x[1] = -1e8;
            }
            for _ in 0..3 {
                let mut y = x.clone();
                g.all_reduce_sum(&mut y).unwrap();
                // ((1e8 + 1e8) + 1e8): the order is fixed; 0 + 1 + 2 for the ranks.
                assert_eq!(y, vec![(1e8f32 + 1e8) + 1e8, (-1e8f32 + 1.0) + 1.0, 3.0]);
            }
            rank
        });
        assert_eq!(ranks, [0, 1, 2]);
    }

    /// Exchanges of many chunks (more than the sockets' buffers hold) and a last chunk shorter
    /// than the others: every value the sum in rank order.
    #[test]
    fn long_exchanges_sum_every_chunk_in_rank_order() {
        const N: usize = 4 * 1024 * 1024 + 7;
        fn value(rank: usize, i: usize) -> f32 {
            ((i * 7 + rank * 13) % 1001) as f32 * 0.37 - 150.0
        }
        let sums = in_group(3, 43, |mut g| {
            let rank = g.rank();
            let mut x: Vec<f32> = (0..N).map(|i| value(rank, i)).collect();
            g.all_reduce_sum(&mut x).unwrap();
            x
        });
        for (rank, got) in sums.iter().enumerate() {
            let wrong = (0..N).find(|&i| {
                got[i].to_bits() != ((value(0, i) + value(1, i)) + value(2, i)).to_bits()
            });
            assert_eq!(wrong, None, "rank {rank}");
        }
    }

    #[test]
    fn other_runs_and_lost_members_are_errors() {
        let addr = free_addr();
        let root = std::thread::spawn(move || Group::join(0, 2, addr, 1).err().unwrap());
        let peer = std::thread::spawn(move || Group::join(1, 2, addr, 2));
        let e = root.join().unwrap().to_string();
        assert!(e.contains("another run's configuration"), "{e}");
        drop(peer.join());

        let addr = free_addr();
        let root = std::thread::spawn(move || {
            let mut g = Group::join(0, 2, addr, 1).unwrap();
            g.all_reduce_sum(&mut [1.0]).err().unwrap().to_string()
        });
        let peer = Group::join(1, 2, addr, 1).unwrap();
        drop(peer);
        let e = root.join().unwrap();
        assert!(e.contains("rank 1 left the group"), "{e}");
        assert!(Group::join(2, 2, addr, 1).is_err());
    }

    /// LMKIT_GROUP_TIMEOUT sets the join's and the exchange's waits; 0 is for ever.
    #[test]
    fn the_timeout_variable_sets_both_waits() {
        let w = |s| {
            let w = Waits::from_setting(s);
            (w.join, w.exchange, w.hello)
        };
        let ten = Duration::from_secs(10);
        assert_eq!(
            w(None),
            (
                Some(Duration::from_secs(300)),
                Some(Duration::from_secs(1800)),
                ten
            )
        );
        let minute = Some(Duration::from_secs(60));
        assert_eq!(w(Some(60)), (minute, minute, ten));
        assert_eq!(w(Some(0)), (None, None, ten));
    }

    /// Waits short enough for a test.
    fn brief(exchange: Option<Duration>) -> Waits {
        Waits {
            join: Some(Duration::from_secs(20)),
            hello: Duration::from_millis(200),
            exchange,
        }
    }

    /// Connects to `addr` once something listens there.
    fn connect(addr: SocketAddr) -> TcpStream {
        let start = Instant::now();
        loop {
            match TcpStream::connect(addr) {
                Ok(s) => return s,
                Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Other programs connecting to MASTER_PORT (one silent, one speaking HTTP) are closed;
    /// the members that come after them form the group.
    #[test]
    fn strangers_at_the_port_are_closed_and_the_group_forms() {
        let addr = free_addr();
        let waits = brief(None);
        let root = std::thread::spawn(move || {
            let mut g = Group::join_within(0, 2, addr, 5, waits).unwrap();
            let mut x = [1.0f32];
            g.all_reduce_sum(&mut x).unwrap();
            x[0]
        });
        let silent = connect(addr);
        let mut http = connect(addr);
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut g = Group::join_within(1, 2, addr, 5, waits).unwrap();
        let mut x = [2.0f32];
        g.all_reduce_sum(&mut x).unwrap();
        assert_eq!((x[0], root.join().unwrap()), (3.0, 3.0));
        drop((silent, http));
    }

    /// A member that joined but never exchanges stops the run after the exchange's wait, with
    /// an error naming it; a root that never answers stops the members that reach it.
    #[test]
    fn silent_members_and_roots_are_errors_naming_them() {
        let addr = free_addr();
        let waits = brief(Some(Duration::from_millis(300)));
        let (done, wait_done) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let g = Group::join_within(1, 2, addr, 6, waits).unwrap();
            // Joined, then silent until the root has given up.
            wait_done.recv().unwrap();
            drop(g);
        });
        let mut g = Group::join_within(0, 2, addr, 6, waits).unwrap();
        let e = g.all_reduce_sum(&mut [1.0]).err().unwrap().to_string();
        done.send(()).unwrap();
        peer.join().unwrap();
        assert!(
            e.contains("rank 1 did not take part in an exchange for 0.3 s")
                && e.contains(TIMEOUT_VAR),
            "{e}"
        );

        // Rank 0's side: a member waits for the root's sum.
        let addr = free_addr();
        let root = std::thread::spawn(move || {
            let g = Group::join_within(0, 2, addr, 6, waits).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(g);
        });
        let mut g = Group::join_within(1, 2, addr, 6, waits).unwrap();
        let e = g.all_reduce_sum(&mut [1.0]).err().unwrap().to_string();
        assert!(e.contains("rank 0 did not take part"), "{e}");
        root.join().unwrap();

        // A port whose program accepts and says nothing (or something else) is not a root.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let other = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
            std::thread::sleep(Duration::from_secs(1));
        });
        let waits = Waits {
            join: Some(Duration::from_millis(500)),
            ..waits
        };
        let e = Group::join_within(1, 2, addr, 6, waits)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("did not answer as the root of an lmkit training group"),
            "{e}"
        );
        other.join().unwrap();
    }
}
