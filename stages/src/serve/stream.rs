//! Streaming: which part of a choice's text is safe to send yet ([`TextStream`]), and
//! Server-Sent Events over a chunked HTTP/1.1 response ([`SseWriter`]).
//!
//! Text is streamed so that the concatenated deltas equal the non-streamed text exactly: a
//! delta never holds text that a stop sequence could still claim (a suffix that begins a stop
//! sequence is held back until the next tokens settle it), nor the replacement character a
//! tokenizer decodes a token that ends inside a UTF-8 sequence to (the next token completes
//! it).

use std::io::{self, Write};

use serde::Serialize;

/// The event that ends a stream, as OpenAI sends it.
pub const DONE_EVENT: &str = "data: [DONE]\n\n";

/// One choice's text as it grows: what has been sent and what may be sent next.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    stops: Vec<String>,
    sent: String,
    stopped: bool,
}

impl TextStream {
    /// A stream whose text is cut before the earliest of `stops`.
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            sent: String::new(),
            stopped: false,
        }
    }

    /// The text sent so far.
    pub fn sent(&self) -> &str {
        &self.sent
    }

    /// Given the whole text decoded so far, the new part that is safe to send now (possibly
    /// empty); it is then counted as sent. After a stop sequence appears nothing more is.
    pub fn advance(&mut self, text: &str) -> String {
        if self.stopped || !text.starts_with(self.sent.as_str()) {
            // A decoder that rewrote earlier text waits for the final text to settle it.
            return String::new();
        }
        let safe = match pipeline_models::generate::find_stop(text, &self.stops) {
            Some(cut) => {
                self.stopped = true;
                cut
            }
            None => {
                let held = self.held_back(text);
                text.len() - held
            }
        };
        self.take(text, safe)
    }

    /// The rest of the choice once its final text (already cut before any stop sequence) is
    /// known: everything not yet sent. `None` if what was sent is not a prefix of it (a
    /// decoder that rewrote earlier text; streaming cannot take text back).
    pub fn finish(&mut self, final_text: &str) -> Option<String> {
        let rest = final_text.strip_prefix(self.sent.as_str())?.to_string();
        self.sent.push_str(&rest);
        self.stopped = true;
        Some(rest)
    }

    fn take(&mut self, text: &str, safe: usize) -> String {
        if safe <= self.sent.len() {
            return String::new();
        }
        let delta = text[self.sent.len()..safe].to_string();
        self.sent.push_str(&delta);
        delta
    }

    /// Bytes at the end of `text` that must wait: a trailing run of U+FFFD (a token ending
    /// inside a UTF-8 sequence), or the longest suffix that is a proper prefix of a stop
    /// sequence, whichever is longer.
    fn held_back(&self, text: &str) -> usize {
        let replacement = text.len() - text.trim_end_matches('\u{FFFD}').len();
        let partial_stop = text
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| {
                let suffix = &text[i..];
                self.stops
                    .iter()
                    .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            })
            .map(|i| text.len() - i)
            .max()
            .unwrap_or(0);
        replacement.max(partial_stop)
    }
}

/// The Server-Sent Event carrying `value` as JSON: `data: {...}\n\n`.
pub fn sse_event(value: &impl Serialize) -> String {
    // Serialising our own response types cannot fail; an error object says so if it ever did.
    let json = serde_json::to_string(value).unwrap_or_else(|e| {
        serde_json::json!({"error": {"message": format!("cannot serialise a chunk: {e}"), "type": "server_error", "param": null, "code": null}}).to_string()
    });
    format!("data: {json}\n\n")
}

/// A `text/event-stream` response written straight onto the connection, each event in its own
/// HTTP chunk and flushed at once (a buffering writer would hold events back).
pub struct SseWriter<W: Write> {
    out: W,
}

impl<W: Write> SseWriter<W> {
    /// Writes the response head (200, `text/event-stream`, chunked, connection closed after).
    pub fn start(mut out: W) -> io::Result<Self> {
        out.write_all(
            b"HTTP/1.1 200 OK\r\n\
              Content-Type: text/event-stream; charset=utf-8\r\n\
              Cache-Control: no-cache\r\n\
              Connection: close\r\n\
              Transfer-Encoding: chunked\r\n\r\n",
        )?;
        out.flush()?;
        Ok(Self { out })
    }

    /// Sends one event (`data: ...\n\n`) as one chunk.
    pub fn event(&mut self, event: &str) -> io::Result<()> {
        if event.is_empty() {
            return Ok(());
        }
        write!(self.out, "{:x}\r\n{event}\r\n", event.len())?;
        self.out.flush()
    }

    /// Sends `data: [DONE]` and the last (empty) chunk; returns the connection.
    pub fn finish(mut self) -> io::Result<W> {
        self.event(DONE_EVENT)?;
        self.out.write_all(b"0\r\n\r\n")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// Streams the growing prefixes of `pieces` and returns the deltas and the final rest.
    fn stream(stop: &[&str], pieces: &[&str], final_text: &str) -> (Vec<String>, String) {
        let mut s = TextStream::new(&stops(stop));
        let mut text = String::new();
        let mut deltas = Vec::new();
        for p in pieces {
            text.push_str(p);
            deltas.push(s.advance(&text));
        }
        let rest = s.finish(final_text).unwrap();
        (deltas, rest)
    }

    #[test]
    fn without_stops_every_piece_goes_out_at_once() {
        let (deltas, rest) = stream(&[], &["Hel", "lo", " world"], "Hello world");
        assert_eq!(deltas, ["Hel", "lo", " world"]);
        assert_eq!(rest, "");
    }

    #[test]
    fn a_possible_stop_start_is_held_until_settled() {
        // "\n" could begin "\nEND": held; "\nx" cannot: released with the next piece.
        let (deltas, rest) = stream(&["\nEND"], &["a", "\n", "x", "\nE", "N"], "a\nx\nEN");
        assert_eq!(deltas, ["a", "", "\nx", "", ""]);
        assert_eq!(rest, "\nEN", "the final text releases what no stop claimed");
    }

    #[test]
    fn text_stops_before_the_earliest_stop_sequence_and_nothing_follows() {
        let (deltas, rest) = stream(
            &["\nEND", "!"],
            &["ab", "c\nEN", "D more", " and more"],
            "abc",
        );
        assert_eq!(deltas, ["ab", "c", "", ""]);
        assert_eq!(rest, "");
        // A stop inside one piece.
        let (deltas, _) = stream(&["STOP"], &["xxSTOPyy"], "xx");
        assert_eq!(deltas, ["xx"]);
    }

    #[test]
    fn the_deltas_concatenate_to_the_non_streamed_text() {
        let text = "def f():\n    return 1\n\ndef g(): pass";
        let stop = ["\ndef", "\nclass"];
        let want = &text[..pipeline_models::generate::find_stop(text, &stops(&stop)).unwrap()];
        // Every way of cutting the text into two-byte pieces (ASCII) streams the same text.
        let pieces: Vec<&str> = (0..text.len())
            .step_by(2)
            .map(|i| &text[i..(i + 2).min(text.len())])
            .collect();
        let (deltas, rest) = stream(&stop, &pieces, want);
        assert_eq!(deltas.concat() + &rest, want);
    }

    #[test]
    fn an_incomplete_utf8_character_waits_for_its_completion() {
        // Successive decodes: the second token ends inside "é", the third completes it.
        let mut s = TextStream::new(&[]);
        assert_eq!(s.advance("caf"), "caf");
        assert_eq!(s.advance("caf\u{FFFD}"), "");
        assert_eq!(s.advance("café!"), "é!");
        assert_eq!(s.finish("café!").as_deref(), Some(""));
    }

    #[test]
    fn text_rewritten_by_the_decoder_is_not_sent_twice() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.advance(" a"), " a");
        // A decoder that strips a leading space once more text follows.
        assert_eq!(s.advance("ab"), "");
        assert_eq!(s.finish("ab"), None);
    }

    #[test]
    fn sse_events_are_framed_as_http_chunks_and_end_with_done() {
        let mut w = SseWriter::start(Vec::new()).unwrap();
        let event = sse_event(&serde_json::json!({"a": "x\ny"}));
        assert_eq!(
            event, "data: {\"a\":\"x\\ny\"}\n\n",
            "one line of JSON, a blank line after"
        );
        w.event(&event).unwrap();
        w.event("").unwrap();
        let bytes = w.finish().unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(head.contains("Content-Type: text/event-stream"));
        assert!(head.contains("Transfer-Encoding: chunked"));
        assert_eq!(
            body,
            format!(
                "{:x}\r\n{event}\r\n{:x}\r\n{DONE_EVENT}\r\n0\r\n\r\n",
                event.len(),
                DONE_EVENT.len()
            )
        );
    }
}
