//! The threads that encode request text (prompts, rendered conversations), one a core. A megabyte of prompt
//! takes the tokenizer ~0.3–0.5 s and ~190 MiB: encoded inline it held an async worker that long (health and
//! every other call on it waited: 0.3–0.5 s on a 2-core server), and on tokio's blocking pool each encode
//! could land on another thread, whose allocator arena kept its peak (8–16 such prompts at once: a peak RSS
//! of 600–800 MiB against 400–450 MiB inline). These threads are few and always the same, so their memory
//! is reused (480–520 MiB), and health answers within 11 ms meanwhile.
//! A caller waits within its deadline; an encode whose caller has left is skipped.

use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use tonic::Status;

use super::deadline::by_deadline;

type Job = Box<dyn FnOnce() + Send>;

/// The encoder threads' queue (the threads end when it is dropped).
pub struct Encoders {
    jobs: mpsc::Sender<Job>,
}

impl Encoders {
    /// `threads` encoder threads.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("encoder-{i}")).spawn(move || loop {
                // The lock is held only to take the next job, not while it runs.
                let job = rx.lock().expect("encoder queue").recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            })?;
        }
        Ok(Encoders { jobs: tx })
    }

    /// `work`'s result, computed on an encoder thread, within `deadline` (`doing` names it in the
    /// DEADLINE_EXCEEDED, and in the INTERNAL of a panic).
    pub async fn run<T: Send + 'static>(
        &self,
        deadline: Option<Instant>,
        doing: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if !tx.is_closed() {
                let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
            }
        });
        let queued = self.jobs.send(job);
        queued.map_err(|_| Status::internal(format!("{doing}: the encoder threads are gone")))?;
        match by_deadline(deadline, doing, rx).await? {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(Status::internal(format!("{doing}: the tokenizer panicked"))),
            Err(_) => Err(Status::internal(format!("{doing}: the encoder threads are gone"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_threads_and_a_panic_fails_only_its_call() {
        let e = Encoders::new(2).unwrap();
        let name = e.run(None, "naming", || std::thread::current().name().map(String::from)).await.unwrap();
        assert!(name.is_some_and(|n| n.starts_with("encoder-")));
        let s = e.run(None, "encoding the prompt", || -> u32 { panic!("boom") }).await.unwrap_err();
        assert_eq!((s.code(), s.message()), (tonic::Code::Internal, "encoding the prompt: the tokenizer panicked"));
        assert_eq!(e.run(None, "adding", || 2 + 2).await.unwrap(), 4, "the thread survived the panic");
        let past = Some(Instant::now());
        let slow = || std::thread::sleep(std::time::Duration::from_millis(200));
        let s = e.run(past, "encoding the prompt", slow).await.unwrap_err();
        assert_eq!((s.code(), s.message()), (tonic::Code::DeadlineExceeded, "deadline exceeded encoding the prompt"));
    }
}
