//! Generated text as it streams: incremental detokenization plus stop strings. Text that could still turn
//! out to be the start of a stop string is held back until it cannot; when a stop string appears, the
//! text ends right before it (or, with `include_stop_str_in_output`, right after it). Before `min_tokens` stop
//! strings are not looked for: one that ends in the text of those tokens never stops the request (vLLM's
//! rule).

use crate::model::{TextStream, Tokenizer};

pub struct StopText {
    stream: TextStream,
    stops: Vec<String>,
    /// End the text after the stop string found, not before it.
    keep_stop: bool,
    /// All text produced so far (truncated at a stop string once one is found).
    full: String,
    /// Bytes of `full` already handed out.
    emitted: usize,
    /// Bytes of `full` produced while stop strings were not looked for: a stop string must end past them.
    unarmed: usize,
    /// Whether the last token pushed was past `min_tokens` (its text, held back, may come out at the flush).
    armed: bool,
    /// The stop string reached, once one is (its index in `stops`).
    found: Option<usize>,
}

impl StopText {
    /// Stops at any of `stops`, keeping the one found at the end of the text when `keep_stop`.
    pub fn new(stops: Vec<String>, keep_stop: bool) -> Self {
        StopText {
            stream: TextStream::default(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            keep_stop,
            full: String::new(),
            emitted: 0,
            unarmed: 0,
            armed: false,
            found: None,
        }
    }

    /// The stop string that ended the text, once one has (vLLM's `stop_reason`).
    pub fn found(&self) -> Option<&str> {
        self.found.map(|i| self.stops[i].as_str())
    }

    /// Cuts the text at the stop string `i` found at `start` (before it, or after it when it is kept): the
    /// text's new length.
    fn cut(&mut self, start: usize, i: usize) -> usize {
        self.found = Some(i);
        let pos = if self.keep_stop { start + self.stops[i].len() } else { start };
        self.full.truncate(pos);
        pos
    }

    /// Spells special tokens out in the text (vLLM's `skip_special_tokens` false) instead of skipping them.
    pub fn keeping_special_tokens(mut self) -> Self {
        self.stream = TextStream::keeping_special_tokens();
        self
    }

    /// Feeds a token; returns the text that may be shown now and whether a stop string was reached. With
    /// `armed` false (before `min_tokens`) no stop string is looked for.
    pub fn push(&mut self, tok: &Tokenizer, id: u32, armed: bool) -> (String, bool) {
        match self.stream.step(tok, id) {
            Ok(Some(chunk)) => self.full.push_str(&chunk),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, token = id, "detokenization failed"),
        }
        self.armed = armed;
        if armed {
            if let Some((start, i)) = self.stop_at() {
                let pos = self.cut(start, i);
                let out = self.full[self.emitted.min(pos)..].to_string();
                self.emitted = pos;
                return (out, true);
            }
        } else {
            self.unarmed = self.full.len();
        }
        // Hold back the longest tail that is a proper prefix of some stop string; a stop string kept in the
        // text ends past everything shown so far, so then nothing is held back (vLLM's `stop_buffer_length` 0).
        let mut hold = 0;
        for s in self.stops.iter().filter(|_| !self.keep_stop) {
            for k in (1..s.len()).rev() {
                if k > hold && s.is_char_boundary(k) && self.full.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        let safe = (self.full.len() - hold).max(self.emitted);
        let out = self.full[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    /// Where the earliest stop string in the text starts, and which one it is (the first given among those
    /// starting there), if one ends in the text not yet looked at (past what was handed out and what came
    /// before `min_tokens`).
    fn stop_at(&self) -> Option<(usize, usize)> {
        // A stop string can only end in the new text, so start the search just far enough back.
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.full.is_char_boundary(from) {
            from -= 1;
        }
        let found = |(i, s): (usize, &String)| {
            // An occurrence that ends past `unarmed` starts at `unarmed + 1 - len` or later.
            let mut start = from.max((self.unarmed + 1).saturating_sub(s.len()));
            while !self.full.is_char_boundary(start) {
                start += 1;
            }
            self.full[start..].find(s.as_str()).map(|p| (start + p, i))
        };
        self.stops.iter().enumerate().filter_map(found).min_by_key(|&(start, _)| start)
    }

    /// Everything still held back (at the end of generation), cut at a stop string that ends in it (text the
    /// decoder held back as an unfinished character comes out now, as U+FFFD, and may complete one); whether
    /// one did.
    pub fn flush(&mut self, tok: &Tokenizer) -> (String, bool) {
        if let Ok(Some(rest)) = self.stream.flush(tok) {
            self.full.push_str(&rest);
        }
        let stop = if self.armed { self.stop_at() } else { None };
        if let Some((start, i)) = stop {
            self.cut(start, i);
        }
        let out = self.full[self.emitted.min(self.full.len())..].to_string();
        self.emitted = self.full.len();
        (out, stop.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo;

    /// Feeds `text` byte by byte through the demo's byte-level tokenizer.
    fn run(text: &str, stops: &[&str]) -> (Vec<String>, bool, String) {
        run_with(text, stops, 0, false)
    }

    /// [`run`], stop strings looked for from the byte after the first `min_tokens` on.
    fn run_after(text: &str, stops: &[&str], min_tokens: usize) -> (Vec<String>, bool, String) {
        run_with(text, stops, min_tokens, false)
    }

    /// [`run_after`], the stop string found kept at the end of the text or not.
    fn run_with(text: &str, stops: &[&str], min_tokens: usize, keep: bool) -> (Vec<String>, bool, String) {
        let tok = demo::tokenizer().unwrap();
        let mut st = StopText::new(stops.iter().map(|s| s.to_string()).collect(), keep);
        let mut chunks = Vec::new();
        for (i, b) in text.bytes().enumerate() {
            let (c, stop) = st.push(&tok, 3 + b as u32, i + 1 > min_tokens);
            chunks.push(c);
            if stop {
                return (chunks, true, String::new());
            }
        }
        let (rest, stop) = st.flush(&tok);
        (chunks, stop, rest)
    }

    /// An unfinished character held back to the end comes out at the flush as U+FFFD: a stop string that it
    /// completes cuts the text there too (it was sent whole, past the stop string).
    #[test]
    fn a_stop_string_completed_by_the_flushed_tail_cuts_it() {
        let tok = demo::tokenizer().unwrap();
        for (keep, want) in [(false, "a"), (true, "a\u{FFFD}")] {
            let mut st = StopText::new(vec!["\u{FFFD}".into()], keep);
            let mut text = String::new();
            for b in [b'a', 0xE2, 0x82] {
                let (chunk, stop) = st.push(&tok, 3 + b as u32, true);
                assert!(!stop);
                text += &chunk;
            }
            let (rest, stop) = st.flush(&tok);
            assert!(stop, "keep {keep}: {text:?} + {rest:?}");
            assert_eq!(text + &rest, want, "keep {keep}");
        }
        // Before min_tokens the flushed tail is not looked at either.
        let mut st = StopText::new(vec!["\u{FFFD}".into()], false);
        for b in [b'a', 0xE2] {
            st.push(&tok, 3 + b as u32, false);
        }
        assert!(!st.flush(&tok).1);
    }

    #[test]
    fn streams_whole_characters() {
        let (chunks, stopped, rest) = run("aé", &[]);
        assert!(!stopped);
        assert_eq!(chunks, vec!["a", "", "é"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn stop_string_ends_the_text_before_it_and_is_never_streamed() {
        let (chunks, stopped, _) = run("hello END world", &["END"]);
        assert!(stopped);
        assert_eq!(chunks.concat(), "hello ");
        // "E" and "EN" were held back, never shown.
        assert!(chunks.iter().all(|c| !c.contains('E')));
    }

    /// `include_stop_str_in_output`: the text ends right after the stop string, streamed as it comes (nothing
    /// held back: the stop string ends past it).
    #[test]
    fn a_kept_stop_string_ends_the_text() {
        let (chunks, stopped, _) = run_with("hello END world", &["END"], 0, true);
        assert!(stopped);
        assert_eq!(chunks.concat(), "hello END");
        assert_eq!(chunks[7], "N", "not held back");
        let (chunks, _, _) = run_with("abc;def.", &[".", ";"], 0, true);
        assert_eq!(chunks.concat(), "abc;");
    }

    /// Stop strings completed by the same token: the earliest start wins (vLLM takes the first in list order
    /// found anywhere), and among those starting there, the first given.
    #[test]
    fn the_earliest_stop_string_wins_then_the_first_given() {
        let at = |text: &str, stops: &[&str]| {
            let mut st = StopText::new(stops.iter().map(|s| s.to_string()).collect(), true);
            st.full = text.to_string();
            st.stop_at()
        };
        // (Where it starts, which one.)
        assert_eq!(at("xENDING", &["END", "ENDING"]), Some((1, 0)));
        assert_eq!(at("xENDING", &["ENDING", "END"]), Some((1, 0)));
        assert_eq!(at("AB", &["B", "A"]), Some((0, 1)));
        assert_eq!(at("AB", &["C"]), None);
    }

    #[test]
    fn a_false_start_is_released() {
        let (chunks, stopped, rest) = run("ENx END", &["END!"]);
        assert!(!stopped);
        assert_eq!(chunks.concat() + &rest, "ENx END");
    }

    /// The one found is the one reported, also when found at the flush.
    #[test]
    fn earliest_of_several_stops_wins_and_is_reported() {
        let (chunks, stopped, _) = run("abc;def.", &[".", ";"]);
        assert!(stopped);
        assert_eq!(chunks.concat(), "abc");
        let tok = demo::tokenizer().unwrap();
        let mut st = StopText::new(vec!["".into(), "x".into(), "c;".into(), ";".into()], false);
        for b in "abc;".bytes() {
            assert_eq!(st.found(), None);
            st.push(&tok, 3 + b as u32, true);
        }
        assert_eq!(st.found(), Some("c;"));
        let mut st = StopText::new(vec!["\u{FFFD}".into()], false);
        st.push(&tok, 3 + 0xE2, true);
        assert_eq!(st.found(), None);
        assert!(st.flush(&tok).1);
        assert_eq!(st.found(), Some("\u{FFFD}"));
    }

    #[test]
    fn stop_strings_ending_before_min_tokens_do_not_stop() {
        // The first "ab" ends at the 3rd token: with min_tokens 3 it is passed over, the next one stops.
        let (chunks, stopped, _) = run_after("xab ab tail", &["ab"], 3);
        assert!(stopped);
        assert_eq!(chunks.concat(), "xab ");
        // One that ends past min_tokens counts, though it started before.
        let (chunks, stopped, _) = run_after("xabc", &["abc"], 2);
        assert!(stopped);
        assert_eq!(chunks.concat(), "x");
        // Overlapping occurrences: "aa" ends at bytes 2 and 3; only the second is past min_tokens.
        let (chunks, stopped, _) = run_after("aaa", &["aa"], 2);
        assert!(stopped);
        assert_eq!(chunks.concat(), "a");
        let (chunks, stopped, rest) = run_after("ab", &["ab"], 2);
        assert!(!stopped);
        assert_eq!(chunks.concat() + &rest, "ab");
    }
}
