//! The engine's [`Event`]s of one call's completions (one, or the request's `n`), merged and turned into
//! `GenerateResponse` messages: [`Completions`] gathers a unary call's, [`StreamTagger`] turns each event of a
//! stream into its message. Each completion is a sequence of its own in the engine; the call answers for all.

use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamMap;

use super::proto;
use crate::engine::{EngineError, Event, FinishReason, PromptLogprobs, StopReason};

/// The most completions one request may ask for (`n`).
pub const MAX_N: u32 = 16;

/// The events of a call's completions, each tagged with its index; a completion's stream ends after its last
/// event (the engine drops its sender), and dropping this tells the engine to stop all of them.
pub type Events = StreamMap<usize, UnboundedReceiverStream<Event>>;

/// Merges the completions' receivers, completion `i` the `i`-th.
pub fn merge(receivers: Vec<mpsc::UnboundedReceiver<Event>>) -> Events {
    let mut events = StreamMap::with_capacity(receivers.len());
    for (i, rx) in receivers.into_iter().enumerate() {
        events.insert(i, UnboundedReceiverStream::new(rx));
    }
    events
}

pub fn to_proto_top(top: Vec<(u32, f32)>) -> proto::TopLogprobs {
    let (token_ids, logprobs) = top.into_iter().unzip();
    proto::TopLogprobs { token_ids, logprobs }
}

/// Puts the scored prompt into `out`.
fn set_prompt(out: &mut proto::GenerateResponse, p: PromptLogprobs) {
    out.prompt_token_ids = p.ids;
    out.prompt_logprobs = p.logprobs;
    out.prompt_top_logprobs = p.top_logprobs.into_iter().map(to_proto_top).collect();
}

fn finish_reason(r: FinishReason) -> proto::FinishReason {
    match r {
        FinishReason::Length => proto::FinishReason::Length,
        FinishReason::EosToken => proto::FinishReason::EosToken,
        FinishReason::StopSequence => proto::FinishReason::StopSequence,
        FinishReason::StopToken => proto::FinishReason::StopToken,
    }
}

fn to_proto_stop(r: StopReason) -> proto::generate_response::StopReason {
    match r {
        StopReason::String(s) => proto::generate_response::StopReason::StopString(s),
        StopReason::Token(id) => proto::generate_response::StopReason::StopTokenId(id),
    }
}

/// A unary call's completions, gathered until each has finished.
pub struct Completions {
    choices: Vec<proto::GenerateResponse>,
    /// What the completions share: the prompt's fields and the adapter version.
    shared: proto::GenerateResponse,
    finished: usize,
}

impl Completions {
    pub fn new(n: usize, adapter_version: String) -> Self {
        let choices = (0..n).map(|i| proto::GenerateResponse { index: i as u32, ..Default::default() }).collect();
        Completions { choices, shared: proto::GenerateResponse { adapter_version, ..Default::default() }, finished: 0 }
    }

    /// Adds completion `i`'s event: true once every completion finished; a completion's failure is the call's.
    pub fn add(&mut self, i: usize, ev: Event) -> Result<bool, EngineError> {
        let out = &mut self.choices[i];
        match ev {
            Event::Started { .. } => {}
            Event::Prompt(p) => set_prompt(&mut self.shared, p),
            Event::Tokens { ids, text, logprobs, top_logprobs } => {
                out.token_ids.extend(ids);
                out.text.push_str(&text);
                out.logprobs.extend(logprobs);
                out.top_logprobs.extend(top_logprobs.into_iter().map(to_proto_top));
            }
            Event::Finished { reason, prompt_tokens, cached_tokens, stop_reason, seed, .. } => {
                self.shared.prompt_tokens = prompt_tokens as u32;
                out.cached_prompt_tokens = cached_tokens as u32;
                out.set_finish_reason(finish_reason(reason));
                out.stop_reason = stop_reason.map(to_proto_stop);
                out.seed = seed;
                self.finished += 1;
            }
            Event::Failed(e) => return Err(e),
        }
        Ok(self.finished == self.choices.len())
    }

    /// The response: for one completion, it with the shared fields (the message as before `n`); for more,
    /// the shared fields with the completions in `choices`.
    pub fn into_response(self) -> proto::GenerateResponse {
        let Completions { mut choices, shared, .. } = self;
        if choices.len() == 1 {
            let one = choices.pop().expect("one completion");
            return proto::GenerateResponse {
                text: one.text,
                token_ids: one.token_ids,
                finish_reason: one.finish_reason,
                logprobs: one.logprobs,
                top_logprobs: one.top_logprobs,
                cached_prompt_tokens: one.cached_prompt_tokens,
                stop_reason: one.stop_reason,
                seed: one.seed,
                ..shared
            };
        }
        proto::GenerateResponse { choices, ..shared }
    }
}

/// Turns a stream's events into its messages, each tagged with its completion's index and the adapter
/// version. The scored prompt (`prompt_logprobs`, completion 0's) goes out with completion 0's first message,
/// and that is the stream's first message, as it is without `n`: the other completions' messages wait for it.
pub struct StreamTagger {
    version: String,
    /// While the scored prompt has not gone out: the other completions' messages, in order.
    held: Option<Vec<proto::GenerateResponse>>,
    prompt: Option<PromptLogprobs>,
    left: usize,
}

impl StreamTagger {
    /// A stream of `n` completions; `scores_prompt` when the request asked for `prompt_logprobs`.
    pub fn new(n: usize, version: String, scores_prompt: bool) -> Self {
        StreamTagger { version, held: scores_prompt.then(Vec::new), prompt: None, left: n }
    }

    /// The messages completion `i`'s event lets go out, in order (none while they wait for the scored prompt);
    /// an error when the completion failed (the call ends with it).
    pub fn messages(&mut self, i: usize, ev: Event) -> Result<Vec<proto::GenerateResponse>, EngineError> {
        let mut msg =
            proto::GenerateResponse { index: i as u32, adapter_version: self.version.clone(), ..Default::default() };
        match ev {
            Event::Started { .. } => return Ok(Vec::new()),
            Event::Prompt(p) => {
                self.prompt = Some(p);
                return Ok(Vec::new());
            }
            Event::Tokens { ids, text, logprobs, top_logprobs } => {
                msg.text = text;
                msg.token_ids = ids;
                msg.logprobs = logprobs;
                msg.top_logprobs = top_logprobs.into_iter().map(to_proto_top).collect();
            }
            Event::Finished { reason, prompt_tokens, cached_tokens, stop_reason, seed, .. } => {
                msg.prompt_tokens = prompt_tokens as u32;
                msg.cached_prompt_tokens = cached_tokens as u32;
                msg.set_finish_reason(finish_reason(reason));
                msg.stop_reason = stop_reason.map(to_proto_stop);
                msg.seed = seed;
                self.left -= 1;
            }
            Event::Failed(e) => return Err(e),
        }
        match &mut self.held {
            // Completion 0's first message (its prompt event came right before it) takes the prompt out first.
            Some(_) if i == 0 => {
                if let Some(p) = self.prompt.take() {
                    set_prompt(&mut msg, p);
                }
                let held = self.held.take().unwrap_or_default();
                Ok(std::iter::once(msg).chain(held).collect())
            }
            Some(held) => {
                held.push(msg);
                Ok(Vec::new())
            }
            None => Ok(vec![msg]),
        }
    }

    /// Whether every completion's final message has gone out: the stream is over.
    pub fn done(&self) -> bool {
        self.left == 0 && self.held.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[u32], text: &str) -> Event {
        Event::Tokens { ids: ids.to_vec(), text: text.into(), logprobs: vec![], top_logprobs: vec![] }
    }

    fn finished(reason: FinishReason, cached: usize) -> Event {
        let (stop_reason, seed) = (None, None);
        Event::Finished { reason, prompt_tokens: 5, cached_tokens: cached, generated_tokens: 2, stop_reason, seed }
    }

    /// Ended by `stop`, sampled with seed 42.
    fn stopped(stop: StopReason) -> Event {
        let reason = match stop {
            StopReason::String(_) => FinishReason::StopSequence,
            StopReason::Token(_) => FinishReason::StopToken,
        };
        let (stop_reason, seed) = (Some(stop), Some(42));
        Event::Finished { reason, prompt_tokens: 5, cached_tokens: 0, generated_tokens: 2, stop_reason, seed }
    }

    fn prompt() -> PromptLogprobs {
        PromptLogprobs { ids: vec![1, 2], logprobs: vec![-0.5], top_logprobs: vec![] }
    }

    /// One completion answers as a call without `n` always did: everything in the top-level message.
    #[test]
    fn one_completion_is_the_plain_response() {
        let mut c = Completions::new(1, "v1".into());
        assert_eq!(c.add(0, Event::Started { queue_time: std::time::Duration::ZERO }), Ok(false));
        assert_eq!(c.add(0, Event::Prompt(prompt())), Ok(false));
        assert_eq!(c.add(0, tokens(&[7], "a")), Ok(false));
        assert_eq!(c.add(0, tokens(&[8], "b")), Ok(false));
        assert_eq!(c.add(0, stopped(StopReason::String("c".into()))), Ok(true));
        let r = c.into_response();
        assert_eq!(r.stop_reason, Some(proto::generate_response::StopReason::StopString("c".into())));
        assert_eq!(r.seed, Some(42));
        assert_eq!((r.text.as_str(), r.token_ids.as_slice(), r.index), ("ab", &[7, 8][..], 0));
        assert_eq!((r.prompt_tokens, r.adapter_version.as_str()), (5, "v1"));
        assert_eq!((&r.prompt_token_ids[..], &r.prompt_logprobs[..]), (&[1, 2][..], &[-0.5][..]));
        assert_eq!(r.finish_reason(), proto::FinishReason::StopSequence);
        assert!(r.choices.is_empty());
    }

    /// Interleaved events land in their own completions; the call is whole only when the last one finishes,
    /// and fails with any one of them.
    #[test]
    fn completions_gather_by_index() {
        let mut c = Completions::new(2, "v1".into());
        assert_eq!(c.add(1, tokens(&[9], "x")), Ok(false));
        assert_eq!(c.add(0, Event::Prompt(prompt())), Ok(false));
        assert_eq!(c.add(0, tokens(&[7], "a")), Ok(false));
        assert_eq!(c.add(1, stopped(StopReason::Token(9))), Ok(false));
        assert_eq!(c.add(0, finished(FinishReason::Length, 0)), Ok(true));
        let r = c.into_response();
        assert!(r.text.is_empty() && r.token_ids.is_empty() && r.stop_reason.is_none() && r.seed.is_none());
        assert_eq!((r.prompt_tokens, r.adapter_version.as_str(), r.prompt_token_ids.len()), (5, "v1", 2));
        let got: Vec<_> = r.choices.iter().map(|c| (c.index, c.text.as_str(), c.finish_reason())).collect();
        assert_eq!(got, [(0, "a", proto::FinishReason::Length), (1, "x", proto::FinishReason::StopToken)]);
        let stops: Vec<_> = r.choices.iter().map(|c| c.stop_reason.clone()).collect();
        assert_eq!(stops, [None, Some(proto::generate_response::StopReason::StopTokenId(9))]);
        assert_eq!(r.choices.iter().map(|c| c.seed).collect::<Vec<_>>(), [None, Some(42)]);
        let mut c = Completions::new(2, "v1".into());
        assert_eq!(c.add(1, Event::Failed(EngineError::DeadlineExceeded)), Err(EngineError::DeadlineExceeded));
    }

    /// A stream's messages carry their completion's index; only the last completion's end ends the stream.
    #[test]
    fn stream_messages_are_tagged() {
        let mut t = StreamTagger::new(2, "v1".into(), false);
        let one = |m: Result<Vec<_>, _>| -> proto::GenerateResponse {
            let mut m = m.unwrap();
            assert_eq!(m.len(), 1);
            m.pop().unwrap()
        };
        let m = one(t.messages(1, tokens(&[9], "x")));
        assert_eq!((m.index, m.text.as_str(), m.adapter_version.as_str()), (1, "x", "v1"));
        let m = one(t.messages(0, tokens(&[7], "a")));
        assert_eq!((m.index, m.text.as_str()), (0, "a"));
        assert_eq!(t.messages(0, Event::Started { queue_time: std::time::Duration::ZERO }), Ok(vec![]));
        let m = one(t.messages(0, stopped(StopReason::String("z".into()))));
        assert_eq!((m.index, m.finish_reason(), t.done()), (0, proto::FinishReason::StopSequence, false));
        assert_eq!(m.stop_reason, Some(proto::generate_response::StopReason::StopString("z".into())));
        assert_eq!(m.seed, Some(42));
        let m = one(t.messages(1, finished(FinishReason::EosToken, 16)));
        assert_eq!((m.index, m.cached_prompt_tokens, m.seed, t.done()), (1, 16, None, true));
        assert_eq!(t.messages(1, Event::Failed(EngineError::DeadlineExceeded)), Err(EngineError::DeadlineExceeded));
    }

    /// With the prompt scored, the stream's first message is completion 0's first, carrying the prompt; the
    /// other completions' messages that came before it follow it, in order.
    #[test]
    fn the_scored_prompt_goes_out_first() {
        let mut t = StreamTagger::new(2, "v1".into(), true);
        assert_eq!(t.messages(1, tokens(&[9], "x")), Ok(vec![]));
        assert_eq!(t.messages(1, finished(FinishReason::EosToken, 4)), Ok(vec![]));
        assert_eq!(t.messages(0, Event::Prompt(prompt())), Ok(vec![]));
        let out = t.messages(0, tokens(&[7], "a")).unwrap();
        let got: Vec<_> = out.iter().map(|m| (m.index, m.text.as_str(), m.prompt_token_ids.len())).collect();
        assert_eq!(got, [(0, "a", 2), (1, "x", 0), (1, "", 0)]);
        assert_eq!(out[2].finish_reason(), proto::FinishReason::EosToken);
        assert!(!t.done());
        let end = t.messages(0, finished(FinishReason::Length, 0)).unwrap();
        assert_eq!((end.len(), end[0].index, t.done()), (1, 0, true));
    }
}
