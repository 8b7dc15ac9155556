//! Chat-template renderings in worker processes. A template is a program, and an adapter's may come from
//! anyone: besides loops (minijinja's fuel bounds those) and printing (bounded as it is written), one can ask
//! a filter for a petabyte at once (`indent(10**15)`), double a string sixty times, nest a value 100,000 deep
//! (its drop overflows the stack) or spend hours inside one filter call, none of which fuel counts and none of
//! which a thread can be stopped from or survive. So the server renders in workers: `server render-worker`
//! children under an address-space limit ([`WORKER_ADDRESS_SPACE`]), one rendering each at a time, at most
//! one a core. A rendering is cut at its request's deadline (or [`RENDER_TIMEOUT`]) by killing its worker;
//! a worker that dies fails only the conversation it was rendering, as the template's fault
//! (FAILED_PRECONDITION), and the next rendering starts a new one. The ids are encoded here: only the
//! template runs in the worker.
//!
//! The wire between them: frames of a little-endian u32 length and that many bytes of JSON, a `Job` down
//! and a `Reply` up; the worker exits at the end of its input.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::model::chat::{Kwargs, PromptEnd, TemplateSources, RENDER_MAX_BYTES};
use crate::model::{ChatError, ChatTemplate};

/// The longest a rendering may take when its request has no deadline: far past the fuel's (50M instructions
/// take a few seconds), so that only work fuel does not count reaches it.
pub const RENDER_TIMEOUT: Duration = Duration::from_secs(30);

/// A worker's address space: its binary and libraries, a conversation as large as a request may carry, and
/// a rendering's 64 MiB of text many times over. An allocation past it fails, and the worker with it.
pub const WORKER_ADDRESS_SPACE: u64 = 4 << 30;

/// The largest frame either side accepts: a reply holds at most [`RENDER_MAX_BYTES`] of text, escaped.
const MAX_FRAME: usize = 8 * RENDER_MAX_BYTES;

/// Templates a worker keeps compiled (the model's, and the adapters' in use), the oldest dropped past it.
const WORKER_TEMPLATES: usize = 32;

/// One rendering, as the worker receives it.
#[derive(Serialize, Deserialize)]
struct Job {
    template: TemplateSources,
    messages: Vec<Value>,
    end: PromptEnd,
    kwargs: Kwargs,
}

/// What a rendering gave: [`ChatTemplate::render_conversation`]'s text or error.
#[derive(Serialize, Deserialize)]
enum Reply {
    Text(String),
    Unavailable(String),
    Render(String),
}

/// Where the server's renderings run.
pub struct Renderer {
    /// The `server` executable whose `render-worker` renders; None renders on the server's own blocking
    /// threads (a library embedding without the binary: a template can then take the process down).
    worker_exe: Option<PathBuf>,
    /// Renderings at once, at most one a core.
    turns: Arc<Semaphore>,
    /// Workers between renderings.
    idle: Mutex<Vec<Worker>>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

/// Why a rendering gave no text.
#[derive(Debug)]
pub enum RenderFailure {
    /// The template's own error or refusal.
    Chat(ChatError),
    /// The request's deadline passed first.
    Deadline,
}

impl Renderer {
    pub fn new(worker_exe: Option<PathBuf>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Renderer { worker_exe, turns: Arc::new(Semaphore::new(cores)), idle: Mutex::new(Vec::new()) }
    }

    /// `template`'s [`ChatTemplate::render_conversation`] of `messages`, by `deadline` (else [`RENDER_TIMEOUT`]).
    /// Dropped before it ends (the client went away), its worker is killed.
    pub async fn render(
        &self,
        template: &ChatTemplate,
        messages: Vec<Value>,
        end: PromptEnd,
        kwargs: Kwargs,
        deadline: Option<std::time::Instant>,
    ) -> Result<String, RenderFailure> {
        let by = deadline.map_or_else(|| Instant::now() + RENDER_TIMEOUT, Instant::from_std);
        let cut = |deadline_passed: bool| match deadline_passed {
            true => RenderFailure::Deadline,
            false => RenderFailure::Chat(ChatError::Unavailable(format!(
                "rendering the chat template: it ran past {} s",
                RENDER_TIMEOUT.as_secs()
            ))),
        };
        let Ok(turn) = tokio::time::timeout_at(by, self.turns.clone().acquire_owned()).await else {
            return Err(cut(deadline.is_some()));
        };
        let turn = turn.expect("never closed");
        let Some(exe) = &self.worker_exe else {
            let template = ChatTemplate::from_sources(&template.sources()).map_err(RenderFailure::Chat)?;
            let work = tokio::task::spawn_blocking(move || {
                let _turn = turn; // held until the rendering ends, also past a deadline that left it
                template.render_conversation(&messages, end, &kwargs)
            });
            return match tokio::time::timeout_at(by, work).await {
                Ok(r) => r
                    .map_err(|e| RenderFailure::Chat(ChatError::Unavailable(e.to_string())))?
                    .map_err(RenderFailure::Chat),
                Err(_) => Err(cut(deadline.is_some())),
            };
        };
        let job = serde_json::to_vec(&Job { template: template.sources(), messages, end, kwargs })
            .map_err(|e| RenderFailure::Chat(ChatError::Render(format!("messages: {e}"))))?;
        let worker = self.idle.lock().expect("idle workers").pop();
        let mut worker = match worker {
            Some(w) => w,
            None => Worker::spawn(exe).map_err(|e| {
                RenderFailure::Chat(ChatError::Unavailable(format!(
                    "starting a chat-template worker ({}): {e}",
                    exe.display()
                )))
            })?,
        };
        match tokio::time::timeout_at(by, worker.round_trip(&job)).await {
            Ok(Ok(reply)) => {
                self.idle.lock().expect("idle workers").push(worker);
                drop(turn);
                match serde_json::from_slice(&reply) {
                    Ok(Reply::Text(text)) => Ok(text),
                    Ok(Reply::Unavailable(e)) => Err(RenderFailure::Chat(ChatError::Unavailable(e))),
                    Ok(Reply::Render(e)) => Err(RenderFailure::Chat(ChatError::Render(e))),
                    Err(e) => Err(RenderFailure::Chat(ChatError::Unavailable(format!(
                        "the chat-template worker answered something unreadable: {e}"
                    )))),
                }
            }
            // The worker died (or broke the protocol): the rendering took it down.
            Ok(Err(e)) => Err(RenderFailure::Chat(ChatError::Unavailable(worker.died(e).await))),
            // Killed on drop.
            Err(_) => Err(cut(deadline.is_some())),
        }
    }
}

impl Worker {
    fn spawn(exe: &std::path::Path) -> std::io::Result<Worker> {
        let mut child = Command::new(exe)
            .arg("render-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LORASERVE_LOG", "error")
            .env("RUST_BACKTRACE", "0")
            .kill_on_drop(true)
            .spawn()?;
        let (stdin, stdout) = (child.stdin.take().expect("piped"), child.stdout.take().expect("piped"));
        Ok(Worker { child, stdin, stdout })
    }

    async fn round_trip(&mut self, job: &[u8]) -> std::io::Result<Vec<u8>> {
        let len = u32::try_from(job.len()).map_err(|_| std::io::Error::other("a conversation past 4 GiB"))?;
        self.stdin.write_all(&len.to_le_bytes()).await?;
        self.stdin.write_all(job).await?;
        self.stdin.flush().await?;
        let mut len = [0u8; 4];
        self.stdout.read_exact(&mut len).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(std::io::Error::other(format!("a reply of {len} bytes")));
        }
        let mut reply = vec![0u8; len];
        self.stdout.read_exact(&mut reply).await?;
        Ok(reply)
    }

    /// Why the worker is gone: how it ended and the last line it wrote (`memory allocation of … failed`,
    /// `has overflowed its stack`).
    async fn died(mut self, error: std::io::Error) -> String {
        let _ = self.child.start_kill();
        let status = self.child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
        let mut said = Vec::new();
        if let Some(stderr) = self.child.stderr.take() {
            let _ = stderr.take(64 << 10).read_to_end(&mut said).await;
        }
        // What the runtime said as it ended (`memory allocation of … failed`, `thread 'main' has overflowed its
        // stack`, a panic's place and message), without its notes on backtraces.
        let said = String::from_utf8_lossy(&said);
        let lines: Vec<&str> =
            said.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("note:")).collect();
        let said: String = lines.join(" ").chars().take(400).collect();
        tracing::warn!(%status, %said, %error, "a chat template's rendering ended its worker");
        let said = if said.is_empty() { said } else { format!(": {said}") };
        format!(
            "rendering the chat template ended its worker process ({status}{said}); past {} GiB of memory or its stack?",
            WORKER_ADDRESS_SPACE >> 30
        )
    }
}

/// The stack a worker renders on: set, so that how deep a template may nest does not depend on the
/// machine's `ulimit -s` (unlimited, the main thread's stack would grow to the address-space limit).
const WORKER_STACK: usize = 8 << 20;

/// `server render-worker`: renders the `Job`s on its input until the input ends, keeping the templates it
/// compiled. Its address space is limited first ([`WORKER_ADDRESS_SPACE`]) where the platform allows.
pub fn worker_main() -> anyhow::Result<()> {
    limit_address_space()?;
    let rendering = std::thread::Builder::new().name("render".into()).stack_size(WORKER_STACK).spawn(serve_jobs)?;
    rendering.join().map_err(|_| anyhow::anyhow!("the rendering thread panicked"))?
}

fn serve_jobs() -> anyhow::Result<()> {
    let (mut input, mut output) = (std::io::stdin().lock(), std::io::stdout().lock());
    let mut compiled: Vec<(TemplateSources, Result<ChatTemplate, ChatError>)> = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let len = u32::from_le_bytes(len) as usize;
        anyhow::ensure!(len <= MAX_FRAME, "a job of {len} bytes");
        let mut job = vec![0u8; len];
        input.read_exact(&mut job)?;
        let job: Job = serde_json::from_slice(&job)?;
        let at = match compiled.iter().position(|(s, _)| *s == job.template) {
            Some(at) => at,
            None => {
                if compiled.len() == WORKER_TEMPLATES {
                    drop(compiled.remove(0));
                }
                let template = ChatTemplate::from_sources(&job.template);
                compiled.push((job.template, template));
                compiled.len() - 1
            }
        };
        let reply = match &compiled[at].1 {
            Ok(t) => match t.render_conversation(&job.messages, job.end, &job.kwargs) {
                Ok(text) => Reply::Text(text),
                Err(ChatError::Unavailable(e)) => Reply::Unavailable(e),
                Err(ChatError::Render(e)) => Reply::Render(e),
            },
            Err(e) => Reply::Unavailable(e.to_string()),
        };
        let reply = serde_json::to_vec(&reply)?;
        output.write_all(&(reply.len() as u32).to_le_bytes())?;
        output.write_all(&reply)?;
        output.flush()?;
    }
}

#[cfg(target_os = "linux")]
fn limit_address_space() -> anyhow::Result<()> {
    use rustix::process::{setrlimit, Resource, Rlimit};
    let limit = Rlimit { current: Some(WORKER_ADDRESS_SPACE), maximum: Some(WORKER_ADDRESS_SPACE) };
    setrlimit(Resource::As, limit).map_err(|e| anyhow::anyhow!("limiting the worker's address space: {e}"))
}

#[cfg(not(target_os = "linux"))]
fn limit_address_space() -> anyhow::Result<()> {
    Ok(())
}
