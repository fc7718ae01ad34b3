//! Collectives between CPU ranks over a TCP ring: rank r sends to r+1 and receives from r-1, on
//! two sockets opened at rendezvous (addresses relayed by the coordinator, each connection
//! authenticated with the job secret). All-reduce is the bandwidth-optimal ring (reduce-scatter
//! then all-gather, each rank moving 2(N-1)/N of the data); chunks need not divide evenly.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{Collective, CollectiveError};
use crate::error::{Result, WorkerError};

const MAGIC: &[u8; 8] = b"ZTRING01";

pub struct TcpRing {
    rank: usize,
    world: usize,
    /// To rank + 1.
    next: TcpStream,
    /// From rank - 1.
    prev: TcpStream,
    peers: Vec<String>,
    scratch: Vec<u8>,
}

fn peer_error(what: &str, peer: usize, addr: &str, e: std::io::Error) -> WorkerError {
    WorkerError::Peer(format!("{what} rank {peer} ({addr}): {e}; that rank probably stopped"))
}

impl TcpRing {
    /// Opens the ring: connects to rank + 1 and accepts rank - 1 on `listener` (whose address is
    /// `peers[rank]`). Both sides prove they know `secret`; strangers are turned away.
    pub fn connect(listener: TcpListener, rank: usize, peers: Vec<String>, secret: &str, timeout: Duration) -> Result<Self> {
        let world = peers.len();
        assert!(world >= 2 && rank < world, "a ring needs two or more ranks");
        let (to, from) = ((rank + 1) % world, (rank + world - 1) % world);
        let deadline = Instant::now() + timeout;
        let next = loop {
            match TcpStream::connect(&peers[to]) {
                Ok(s) => break s,
                // The peer may still be starting: retry until the deadline.
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(peer_error("cannot connect to", to, &peers[to], e)),
            }
        };
        next.set_nodelay(true).ok();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(secret.len() as u32).to_le_bytes());
        hello.extend_from_slice(secret.as_bytes());
        (&next).write_all(&hello).map_err(|e| peer_error("cannot greet", to, &peers[to], e))?;

        listener.set_nonblocking(true).map_err(|e| WorkerError::Peer(format!("ring listener: {e}")))?;
        let prev = loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).ok();
                    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    if greeting_ok(&stream, from, secret) {
                        stream.set_read_timeout(None).ok();
                        stream.set_nodelay(true).ok();
                        break stream;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    let e = if e.kind() == std::io::ErrorKind::WouldBlock { std::io::Error::other("timed out waiting") } else { e };
                    return Err(peer_error("no connection from", from, &peers[from], e));
                }
            }
        };
        Ok(Self { rank, world, next, prev, peers, scratch: vec![] })
    }

    /// Sends `send` to rank + 1 while receiving `recv.len()` bytes from rank - 1.
    fn exchange(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        let (to, from) = ((self.rank + 1) % self.world, (self.rank + self.world - 1) % self.world);
        let (next, prev, peers) = (&self.next, &self.prev, &self.peers);
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || (&*next).write_all(send));
            let received = (&*prev).read_exact(recv).map_err(|e| peer_error("lost", from, &peers[from], e));
            let sent = sender.join().expect("ring sender thread").map_err(|e| peer_error("lost", to, &peers[to], e));
            received.and(sent)
        })
    }

    /// Chunk `i` of `n` elements split `world` ways (sizes differ by at most one).
    fn chunk(&self, n: usize, i: usize) -> std::ops::Range<usize> {
        let i = i % self.world;
        (i * n / self.world)..((i + 1) * n / self.world)
    }

    /// Ring reduce-scatter over `data` (in place): afterwards chunk (rank + 1 + shift) holds the
    /// full sum on this rank.
    fn reduce_scatter_in_place<T: Element>(&mut self, data: &mut [T], shift: usize) -> Result<()> {
        let (n, w) = (data.len(), self.world);
        for s in 0..w - 1 {
            let send = self.chunk(n, self.rank + shift + w - s);
            let recv = self.chunk(n, self.rank + shift + 2 * w - s - 1);
            let mut incoming = std::mem::take(&mut self.scratch);
            incoming.resize(recv.len() * T::SIZE, 0);
            self.exchange(T::bytes(&data[send]), &mut incoming)?;
            for (d, x) in data[recv].iter_mut().zip(incoming.chunks_exact(T::SIZE)) {
                *d = d.add(T::from_bytes(x));
            }
            self.scratch = incoming;
        }
        Ok(())
    }

    /// Ring all-gather of `data` (in place) where this rank holds chunk (rank + shift) of `world`
    /// chunks of `elem`-byte values.
    fn all_gather_in_place(&mut self, data: &mut [u8], elem: usize, shift: usize) -> Result<()> {
        let (n, w) = (data.len() / elem, self.world);
        for s in 0..w - 1 {
            let send = self.chunk(n, self.rank + shift + w - s);
            let recv = self.chunk(n, self.rank + shift + 2 * w - s - 1);
            let mut incoming = std::mem::take(&mut self.scratch);
            incoming.resize(recv.len() * elem, 0);
            self.exchange(&data[send.start * elem..send.end * elem], &mut incoming)?;
            data[recv.start * elem..recv.end * elem].copy_from_slice(&incoming);
            self.scratch = incoming;
        }
        Ok(())
    }
}

fn greeting_ok(mut stream: &TcpStream, from: usize, secret: &str) -> bool {
    let mut head = [0u8; 16];
    if stream.read_exact(&mut head).is_err() || &head[..8] != MAGIC {
        return false;
    }
    let rank = u32::from_le_bytes(head[8..12].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
    let mut theirs = vec![0u8; len.min(4096)];
    rank == from && len == secret.len() && stream.read_exact(&mut theirs).is_ok() && theirs == secret.as_bytes()
}

/// A value the ring can sum.
trait Element: Copy {
    const SIZE: usize;
    fn add(self, other: Self) -> Self;
    fn from_bytes(b: &[u8]) -> Self;
    fn bytes(values: &[Self]) -> &[u8] {
        // SAFETY: plain-old-data floats viewed as their bytes.
        unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, std::mem::size_of_val(values)) }
    }
}

impl Element for f32 {
    const SIZE: usize = 4;
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn from_bytes(b: &[u8]) -> Self {
        f32::from_ne_bytes(b.try_into().unwrap())
    }
}

impl Element for f64 {
    const SIZE: usize = 8;
    fn add(self, other: Self) -> Self {
        self + other
    }
    fn from_bytes(b: &[u8]) -> Self {
        f64::from_ne_bytes(b.try_into().unwrap())
    }
}

fn check_host(t: &Tensor) -> Result<usize> {
    if t.device() != Device::Cpu || !t.is_contiguous() {
        return Err(CollectiveError::NotHost.into());
    }
    Ok(t.numel() * t.kind().elt_size_in_bytes())
}

/// The bytes of a contiguous host tensor.
fn host_bytes(t: &Tensor) -> Result<&[u8]> {
    let len = check_host(t)?;
    // SAFETY: contiguous host storage of `len` bytes that outlives the borrow.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) })
}

/// The bytes of a contiguous host tensor, to write.
fn host_bytes_mut(t: &mut Tensor) -> Result<&mut [u8]> {
    let len = check_host(t)?;
    // SAFETY: contiguous host storage of `len` bytes, borrowed mutably through `t` for the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) })
}

fn typed<T>(bytes: &mut [u8]) -> &mut [T] {
    // SAFETY: torch storage is aligned for its element type, and callers match T to the kind.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, bytes.len() / std::mem::size_of::<T>()) }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, values: &mut Tensor) -> Result<()> {
        let kind = values.kind();
        let bytes = host_bytes_mut(values)?;
        match kind {
            Kind::Float => {
                self.reduce_scatter_in_place(typed::<f32>(bytes), 0)?;
                self.all_gather_in_place(bytes, 4, 1)
            }
            Kind::Double => {
                self.reduce_scatter_in_place(typed::<f64>(bytes), 0)?;
                self.all_gather_in_place(bytes, 8, 1)
            }
            kind => Err(CollectiveError::RingKind { kind }.into()),
        }
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        let n = output.numel();
        if input.numel() != n * self.world || input.kind() != Kind::Float || output.kind() != Kind::Float {
            return Err(CollectiveError::RingReduceScatter { input: input.numel(), output: n, world: self.world }.into());
        }
        let mut work = host_bytes(input)?.to_vec();
        // Shift by world - 1 so this rank ends up holding the sum of its own chunk.
        self.reduce_scatter_in_place(typed::<f32>(&mut work), self.world - 1)?;
        host_bytes_mut(output)?.copy_from_slice(&work[self.rank * n * 4..(self.rank + 1) * n * 4]);
        Ok(())
    }

    fn all_gather(&mut self, buffer: &mut Tensor) -> Result<()> {
        if !buffer.numel().is_multiple_of(self.world) {
            return Err(CollectiveError::UnevenGather { len: buffer.numel(), world: self.world }.into());
        }
        let elem = buffer.kind().elt_size_in_bytes();
        self.all_gather_in_place(host_bytes_mut(buffer)?, elem, 0)
    }

    fn broadcast(&mut self, data: &mut Tensor, root: usize) -> Result<()> {
        // Pass the whole buffer along the ring from root; the rank before root does not forward.
        let bytes = host_bytes_mut(data)?;
        let (to, from) = ((self.rank + 1) % self.world, (self.rank + self.world - 1) % self.world);
        if self.rank != root {
            (&self.prev).read_exact(bytes).map_err(|e| peer_error("lost", from, &self.peers[from], e))?;
        }
        if to != root {
            (&self.next).write_all(bytes).map_err(|e| peer_error("lost", to, &self.peers[to], e))?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut token = Tensor::zeros([1], (Kind::Double, Device::Cpu));
        self.all_reduce(&mut token)
    }
}
