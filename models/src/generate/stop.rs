//! Stop sequences matched on decoded text.
//!
//! Matching text rather than token ids matters because one stop string (say `"\ndef"`) can be
//! spelled by many token sequences, and can straddle the boundary between two tokens.

/// The stop set used by OpenAI's HumanEval evaluation (and the Codex paper): stop when the model
/// starts a new top-level statement after the function body; plus the end of a Markdown code
/// fence, which instruction-tuned models write after the code (bigcode-evaluation-harness stops
/// there too).
pub const HUMANEVAL_STOP_SEQUENCES: [&str; 6] =
    ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```"];

/// [`HUMANEVAL_STOP_SEQUENCES`] as owned strings, ready for a generation request.
pub fn humaneval_stop_sequences() -> Vec<String> {
    HUMANEVAL_STOP_SEQUENCES
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Byte offset in `text` where the earliest stop sequence begins, if any occurs.
///
/// When several occur, the one starting first wins (so the cut is the shortest possible);
/// empty stop strings are ignored.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}
