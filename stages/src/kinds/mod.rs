//! Stage kinds: one module per kind, each implementing [`pipeline_engine::Stage`].

pub mod lora_train;
pub mod model;
pub mod model_artifact;
pub mod quantize;
