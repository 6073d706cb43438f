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
//! the reference for a GPU collective (NCCL), which the group would use for GPU buffers.

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
        Ok(Group { rank, world, link })
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

    fn read_f32s(&mut self, out: &mut [f32]) -> std::io::Result<()> {
        let mut n = [0u8; 8];
        self.reader.read_exact(&mut n)?;
        if u64::from_le_bytes(n) != out.len() as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} values sent where {} were expected (the members train different models)",
                    u64::from_le_bytes(n),
                    out.len()
                ),
            ));
        }
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

    /// Three members in threads: each gets the sum, added in rank order.
    #[test]
    fn all_reduce_sums_in_rank_order() {
        let addr = free_addr();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut g = Group::join(rank, 3, addr, 42).unwrap();
                    assert_eq!((g.rank(), g.world(), g.is_root()), (rank, 3, rank == 0));
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
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
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
}
