//! [`CpuRuntimes`]: one single-threaded async runtime per CPU, for connections served on
//! the CPU their packets arrive on.
//!
//! A booting machine reads one request at a time, so each request's latency is one
//! round trip: the client's packet wakes the server, the reply wakes the client. When the
//! thread serving a connection runs on another CPU than the one that received the packet,
//! each wake-up crosses CPUs (an inter-processor interrupt, a cold cache); measured on
//! this project's 2-vCPU test machines, that is most of a 4 KiB read's latency over
//! loopback (about 30 us on one CPU, 150 us across two). A protocol that asks the kernel
//! which CPU a connection's packets arrive on (`SO_INCOMING_CPU`, the receive queue's CPU
//! for a NIC, the sender's for loopback) serves it on that CPU's runtime, so the wake-up
//! stays local, as servers built on `SO_INCOMING_CPU` do.
//!
//! Each runtime's thread is pinned to its CPU; threads its blocking pool starts (file
//! reads) run on any CPU. Without CPU information, or with one CPU, protocols serve on
//! the server's shared runtime as before.

use std::fmt;
use std::os::fd::AsRawFd;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// One runtime per CPU this process may run on; dropped, they stop.
pub struct CpuRuntimes {
    /// By CPU number (`None` for CPUs this process may not use).
    handles: Vec<Option<Handle>>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl fmt::Debug for CpuRuntimes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuRuntimes")
            .field("cpus", &self.threads.len())
            .finish()
    }
}

impl CpuRuntimes {
    /// No per-CPU runtime: everything runs on the shared one.
    pub fn none() -> Self {
        CpuRuntimes {
            handles: Vec::new(),
            stops: Vec::new(),
            threads: Vec::new(),
        }
    }

    /// Starts a runtime on each CPU this process may use (none when it may use one).
    pub fn start() -> Result<Self> {
        let allowed = allowed_cpus()?;
        if allowed.len() < 2 {
            return Ok(CpuRuntimes::none());
        }
        let mut runtimes = CpuRuntimes::none();
        let max = allowed.iter().copied().max().unwrap_or(0);
        let allowed_count = allowed.len();
        runtimes.handles = vec![None; max + 1];
        for &cpu in &allowed {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let everywhere = allowed.clone();
            let thread = std::thread::Builder::new()
                .name(format!("osstream-cpu{cpu}"))
                .spawn(move || {
                    let outcome = pin_to(&[cpu]).and_then(|()| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            // Together no more blocking threads than one shared pool has.
                            .max_blocking_threads((512 / allowed_count).max(16))
                            .thread_name(format!("osstream-cpu{cpu}-blocking"))
                            // Blocking work (file reads) may use every CPU.
                            .on_thread_start(move || {
                                let _ = pin_to(&everywhere);
                            })
                            .build()
                            .map_err(|e| Error::from_io(e, "cannot start a per-CPU runtime"))
                    });
                    match outcome {
                        Ok(runtime) => {
                            let _ = handle_tx.send(Ok(runtime.handle().clone()));
                            runtime.block_on(async {
                                let _ = stop_rx.await;
                            });
                        }
                        Err(err) => {
                            let _ = handle_tx.send(Err(err));
                        }
                    }
                })
                .map_err(|e| Error::from_io(e, "cannot start a per-CPU thread"))?;
            let handle = handle_rx.recv().map_err(|_| {
                Error::new(
                    crate::ErrorKind::Unexpected,
                    "a per-CPU runtime thread ended at start",
                )
            })??;
            runtimes.handles[cpu] = Some(handle);
            runtimes.stops.push(stop_tx);
            runtimes.threads.push(thread);
        }
        Ok(runtimes)
    }

    /// How many CPUs have a runtime.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether there is no per-CPU runtime.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// The runtime of the CPU that receives `socket`'s packets, if the kernel says and
    /// that CPU has one.
    pub fn for_socket(&self, socket: &impl AsRawFd) -> Option<&Handle> {
        if self.is_empty() {
            return None;
        }
        let cpu = incoming_cpu(socket)?;
        self.handles.get(cpu)?.as_ref()
    }
}

impl Drop for CpuRuntimes {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        // Not joined: a runtime may be finishing a task that outlived the server's
        // drain; the process is ending anyway.
        self.threads.clear();
    }
}

/// The CPU the kernel last processed `socket`'s incoming packets on.
fn incoming_cpu(socket: &impl AsRawFd) -> Option<usize> {
    let mut cpu: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cpu`, a c_int that lives across
    // the call; the fd is open for as long as `socket` is borrowed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&mut cpu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && cpu >= 0).then_some(cpu as usize)
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills at most
    // size_of::<cpu_set_t>() bytes of it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::from_io(
            std::io::Error::last_os_error(),
            "cannot read the CPUs this process may use",
        ));
    }
    let count = libc::CPU_SETSIZE as usize;
    // SAFETY: CPU_ISSET reads one bit of the set for each index below CPU_SETSIZE.
    Ok((0..count)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts the calling thread to `cpus`.
fn pin_to(cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: CPU_SET writes one bit of the set; every cpu came from allowed_cpus,
        // so it is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sched_setaffinity reads size_of::<cpu_set_t>() bytes of `set`; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::from_io(
            std::io::Error::last_os_error(),
            "cannot pin a thread to its CPU",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_loopback_connection_is_served_on_the_cpu_its_bytes_arrive_on() {
        let runtimes = CpuRuntimes::start().unwrap();
        if allowed_cpus().unwrap().len() < 2 {
            assert!(runtimes.is_empty());
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        client.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).unwrap();
        let cpu = incoming_cpu(&accepted).expect("the kernel names the incoming CPU");
        let handle = runtimes
            .for_socket(&accepted)
            .expect("a runtime for that CPU");
        let (tx, rx) = std::sync::mpsc::channel();
        let sender = tx.clone();
        handle.spawn(async move {
            // SAFETY: sched_getcpu has no preconditions.
            let _ = sender.send(vec![unsafe { libc::sched_getcpu() } as usize]);
        });
        let ran_on = rx.recv().unwrap();
        assert_eq!(
            ran_on,
            vec![cpu],
            "the runtime's thread is pinned to its CPU"
        );
        // Its blocking pool is not pinned.
        handle.spawn(async move {
            let allowed = tokio::task::spawn_blocking(|| allowed_cpus().unwrap()).await;
            let _ = tx.send(allowed.unwrap());
        });
        let allowed = rx.recv().unwrap();
        assert_eq!(allowed, allowed_cpus().unwrap());
    }
}
