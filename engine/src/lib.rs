//! The ML-agnostic core of `pipeline`.
//!
//! The flow is `manifest -> graph -> keys -> executor -> stage -> store`:
//!
//! * [`manifest`] parses a TOML experiment into expanded, validated stage instances, reporting
//!   every problem as a [`miette`] diagnostic pointing into the manifest.
//! * [`graph`] orders the stages (a [`petgraph`] DAG) and renders it.
//! * [`fingerprint`] computes each stage's cache key from its kind, kind version, canonical
//!   parameters, the content of its inputs and anything else the kind declares, and explains
//!   why a key differs from the last run (in the spirit of cargo's fingerprints).
//! * [`diagnostic`] turns any error into one JSON shape, with lines and columns.
//! * [`decision`] is the typed answer to "cached or run, and why", shared by plans and runs.
//! * [`executor`] runs what is not cached, in dependency order and in parallel.
//! * [`params`] describes and checks a kind's parameters from their schema.
//! * [`runs`] keeps every run's record in the cache and lines runs up side by side.
//! * [`stage`] is the contract a stage kind implements; the engine knows nothing else about it.
//! * [`store`] is the content-addressed cache: objects, trees, action records, checkpoints.

#![warn(missing_docs)]

pub mod atomic;
pub mod dag;
pub mod decision;
pub mod diagnostic;
pub mod executor;
pub mod fingerprint;
pub mod graph;
pub mod hashing;
pub mod lease;
pub mod manifest;
pub mod params;
pub mod progress;
pub mod runs;
pub mod slurm;
pub mod stage;
pub mod store;

pub use executor::{run, RunOptions, RunReport, StageOutcome};
pub use manifest::{load_manifest, InstanceName, Manifest, ManifestOptions, StageInstance};
pub use stage::{
    CachedOutput, CachedStage, Command, InputArtifact, InputSlot, KindDoc, OutputSlot, Registry,
    Stage, StageCommand, StageContext,
};
pub use store::Store;
