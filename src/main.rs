//! The `pipeline` binary: the CLI over every stage kind in `pipeline-stages`.

fn main() -> std::process::ExitCode {
    pipeline::main_with(pipeline_stages::registry())
}
