//! The session event loops of `[proxy] workers` above one: each a thread with a current-thread runtime and its own epoll, as nginx's worker processes; every listener is accepted on each loop, and a session lives on the loop that accepted it.
//!
//! Why not one multi-threaded runtime: its threads share one I/O driver, which wakes every
//! session whose socket became readable in one batch, and those sessions then run on whichever
//! thread takes them, in no particular order. Two clients' packets written a moment apart (a
//! responder's SUBSCRIBE, then a requester's PUBLISH) then reach the broker in either order:
//! 8-16 of 40 overtaken with two threads (tests/order.rs), none through nginx with two
//! workers. A loop of its own per thread handles its sockets in the order they became
//! readable, as one nginx worker does.

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Running loops; dropping them stops each (its remaining tasks are dropped) and joins its
/// thread.
pub struct Loops {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Loops {
    pub fn start(n: usize) -> std::io::Result<Loops> {
        let mut loops = Loops { handles: Vec::new(), stops: Vec::new(), threads: Vec::new() };
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            loops.handles.push(runtime.handle().clone());
            loops.stops.push(stop);
            let thread = std::thread::Builder::new().name(format!("meshgate-loop-{i}")).spawn(move || {
                // Tasks spawned on the handle run while this thread is in `block_on`.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
            loops.threads.push(thread);
        }
        Ok(loops)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_loop_runs_its_tasks_on_its_own_thread_and_stops_when_dropped() {
        let loops = Loops::start(2).unwrap();
        let names: Vec<String> = loops
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move { tx.send(std::thread::current().name().unwrap_or_default().to_string()) });
                rx.recv_timeout(std::time::Duration::from_secs(5)).expect("the loop runs its task")
            })
            .collect();
        assert_eq!(names, ["meshgate-loop-0", "meshgate-loop-1"]);
        let handle = loops.handles()[0].clone();
        drop(loops);
        // The runtime is gone: a task spawned now never runs.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(handle.spawn(async move {
            let _ = tx.send(());
        }));
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err());
    }
}
