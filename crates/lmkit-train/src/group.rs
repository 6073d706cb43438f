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

/// How long the members of a group wait for each other to appear.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// This process's place in its training group.
pub struct Group {
    rank: usize,
    world: usize,
    link: Link,
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

impl Group {
    /// A group of one: nothing is exchanged.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world: 1,
            link: Link::Single,
            #[cfg(feature = "cuda")]
            gpus: None,
        }
    }

    /// The group described by `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` (a group
    /// of one when `WORLD_SIZE` is unset or 1). `fingerprint` identifies the run (its
    /// configuration): processes of different runs refuse to form a group.
    pub fn from_env(fingerprint: u64) -> Result<Group> {
        let world = var("WORLD_SIZE")?.unwrap_or(1);
        if world <= 1 {
            return Ok(Group::single());
        }
        let rank = var("RANK")?.ok_or_else(|| group_err("WORLD_SIZE is set but RANK is not"))?;
        let host = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = var("MASTER_PORT")?
            .ok_or_else(|| group_err("WORLD_SIZE is set but MASTER_PORT is not"))?;
        let addr = (host.as_str(), port as u16)
            .to_socket_addrs()
            .map_err(|e| group_err(format!("MASTER_ADDR {host}:{port}: {e}")))?
            .next()
            .ok_or_else(|| group_err(format!("MASTER_ADDR {host} has no address")))?;
        Group::join(rank, world, addr, fingerprint)
    }

    /// Joins (rank > 0) or gathers (rank 0) the group of `world` processes at `addr`.
    pub fn join(rank: usize, world: usize, addr: SocketAddr, fingerprint: u64) -> Result<Group> {
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
            let start = Instant::now();
            while peers.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).net()?;
                        let mut conn = Conn::new(stream)?;
                        let (r, w, f) = conn.read_hello()?;
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
                        peers[r - 1] = Some(conn);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() > JOIN_TIMEOUT {
                            let missing: Vec<String> = peers
                                .iter()
                                .enumerate()
                                .filter(|(_, p)| p.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(group_err(format!(
                                "ranks {} did not join within {} s",
                                missing.join(", "),
                                JOIN_TIMEOUT.as_secs()
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
                    Err(e) if start.elapsed() > JOIN_TIMEOUT => {
                        return Err(group_err(format!(
                            "rank {rank} could not reach rank 0 at {addr} within {} s: {e}",
                            JOIN_TIMEOUT.as_secs()
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            let mut conn = Conn::new(stream)?;
            conn.write_hello(rank, world, fingerprint)?;
            Link::Peer(conn)
        };
        Ok(Group {
            rank,
            world,
            link,
            #[cfg(feature = "cuda")]
            gpus: None,
        })
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
        match &mut self.link {
            Link::Single => Ok(()),
            Link::Peer(conn) => conn
                .read_bytes(data)
                .map_err(|e| group_err(format!("rank 0 left the group ({e}); this run stops"))),
            Link::Root(peers) => {
                for conn in peers.iter_mut() {
                    conn.write_bytes(data)?;
                }
                Ok(())
            }
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
        let comm = lmkit_kernels::cuda::Comm::new(nccl, device, id, self.rank, self.world)
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
        match &mut self.link {
            Link::Single => Ok(()),
            Link::Peer(conn) => {
                conn.write_f32s(data)?;
                conn.read_f32s(data)
                    .map_err(|e| group_err(format!("rank 0 left the group ({e}); this run stops")))
            }
            Link::Root(peers) => {
                let mut buf = vec![0f32; data.len()];
                for (i, conn) in peers.iter_mut().enumerate() {
                    conn.read_f32s(&mut buf).map_err(|e| {
                        group_err(format!(
                            "rank {} left the group ({e}); this run stops",
                            i + 1
                        ))
                    })?;
                    for (d, b) in data.iter_mut().zip(&buf) {
                        *d += b;
                    }
                }
                for conn in peers.iter_mut() {
                    conn.write_f32s(data)?;
                }
                Ok(())
            }
        }
    }
}

impl Conn {
    fn new(stream: TcpStream) -> Result<Conn> {
        stream.set_nodelay(true).net()?;
        Ok(Conn {
            reader: BufReader::with_capacity(1 << 20, stream.try_clone().net()?),
            writer: BufWriter::with_capacity(1 << 20, stream),
        })
    }

    fn write_hello(&mut self, rank: usize, world: usize, fingerprint: u64) -> Result<()> {
        self.writer.write_all(MAGIC).net()?;
        self.writer.write_all(&(rank as u64).to_le_bytes()).net()?;
        self.writer.write_all(&(world as u64).to_le_bytes()).net()?;
        self.writer.write_all(&fingerprint.to_le_bytes()).net()?;
        self.writer.flush().net()?;
        Ok(())
    }

    fn read_hello(&mut self) -> Result<(usize, usize, u64)> {
        let mut m = [0u8; 4];
        self.reader.read_exact(&mut m).net()?;
        if &m != MAGIC {
            return Err(group_err(
                "something other than an lmkit training process connected to MASTER_PORT",
            ));
        }
        let mut w = [0u8; 8];
        let mut next = || -> Result<u64> {
            self.reader.read_exact(&mut w).net()?;
            Ok(u64::from_le_bytes(w))
        };
        Ok((next()? as usize, next()? as usize, next()?))
    }

    fn write_f32s(&mut self, data: &[f32]) -> Result<()> {
        self.writer
            .write_all(&(data.len() as u64).to_le_bytes())
            .net()?;
        for chunk in data.chunks(1 << 16) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.writer.write_all(&bytes).net()?;
        }
        self.writer.flush().net()?;
        Ok(())
    }

    fn write_bytes(&mut self, data: &[u8]) -> Result<()> {
        self.writer
            .write_all(&(data.len() as u64).to_le_bytes())
            .net()?;
        self.writer.write_all(data).net()?;
        self.writer.flush().net()
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
        let mut bytes = vec![0u8; 4 << 16];
        for chunk in out.chunks_mut(1 << 16) {
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
}
