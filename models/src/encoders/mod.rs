//! Sentence encoders: text (as token ids) in, one fixed-size vector per text out.
//!
//! - [`minilm`]: all-MiniLM-L6-v2, a BERT encoder with mean pooling and L2 normalisation, as
//!   sentence-transformers computes it. Inference only; on the CPU its elementwise work runs
//!   in place (`fused::inplace`).
//!
//! Tokenizing stays with the caller (the tokenizer file sits beside the weights); the
//! encoder takes token-id sequences and pads them itself.

pub mod minilm;

pub use minilm::{BertConfig, EncoderError, HiddenAct, MiniLm};
