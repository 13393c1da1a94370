//! The `synthesize` kind: exercises verified by execution (wrong solutions and vacuous tests
//! rejected, in the real sandbox), the `openai` generator against a server that misbehaves on
//! purpose (retries, refusals, the key, resuming without asking twice), and the `local`
//! generator on a tiny model with a chat template.

mod kinds_eval_support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kinds_eval_support::{read_jsonl, run_stage, write_tiny_model};
use pipeline_stages::grade::{Sandbox, SandboxOptions};
use pipeline_stages::kinds::synthesize::Synthesize;
use pipeline_stages::synth::exercise::{parse_exercise, verify, Rejection};

fn sandbox() -> Sandbox {
    Sandbox::new(SandboxOptions {
        timeout_s: 2.0,
        ..SandboxOptions::default()
    })
    .unwrap()
}

fn verdict(answer: &str) -> Option<Rejection> {
    let exercise = parse_exercise(answer).unwrap();
    verify(&exercise, &sandbox()).rejection
}

#[test]
fn the_verifier_keeps_a_correct_exercise_and_rejects_wrong_solutions_and_vacuous_tests() {
    let correct = "```python\ndef add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n    return a + b\n\nassert add(1, 2) == 3\n```";
    assert_eq!(verdict(correct), None);

    let wrong =
        "def square(x):\n    \"\"\"x squared.\"\"\"\n    return x * 2\n\nassert square(3) == 9\n";
    assert_eq!(verdict(wrong), Some(Rejection::SolutionFails));

    // Passes with any body, including `pass`: tests nothing.
    let vacuous = "def shout(s):\n    \"\"\"s in capitals.\"\"\"\n    return s.upper()\n\nassert shout('a') == shout('a')\n";
    assert_eq!(verdict(vacuous), Some(Rejection::VacuousTests));
    let vacuous_type_check =
        "def f(x):\n    \"\"\"Doubles x.\"\"\"\n    return 2 * x\n\nassert f(2) is not 5\n";
    assert_eq!(verdict(vacuous_type_check), Some(Rejection::VacuousTests));

    let crashes = "def first(xs):\n    \"\"\"First item.\"\"\"\n    return xs[10]\n\nassert first([1]) == 1\n";
    assert_eq!(verdict(crashes), Some(Rejection::SolutionFails));

    let hangs = "def spin(n):\n    \"\"\"Loops.\"\"\"\n    while True:\n        n += 1\n\nassert spin(1) == 2\n";
    assert_eq!(verdict(hangs), Some(Rejection::TimedOut));

    // A helper and a test function: both take part.
    let helper = "import math\n\ndef _sq(x):\n    return x * x\n\ndef hyp(a, b):\n    \"\"\"Hypotenuse.\"\"\"\n    return math.sqrt(_sq(a) + _sq(b))\n\ndef test_hyp():\n    assert hyp(3, 4) == 5\n";
    assert_eq!(verdict(helper), None);
}

/// The fake server (stages/tests/fixtures/fake_openai.py), its state directory and base URL.
struct FakeServer {
    child: Child,
    state: PathBuf,
    url: String,
}

impl FakeServer {
    fn start(state: &Path, flaky: bool) -> FakeServer {
        std::fs::create_dir_all(state).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_openai.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(state).arg("sekrit");
        if flaky {
            cmd.arg("--flaky");
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        FakeServer {
            child,
            state: state.to_path_buf(),
            url: format!("http://127.0.0.1:{port}/v1"),
        }
    }

    /// Lines of its request log: `ok <prompt>`, or the status of a refused request.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.state.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openai_params(
    url: &str,
    topics: &[&str],
    count: usize,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut p = serde_json::json!({
        "mode": "exercises",
        "topics": topics,
        "audiences": ["a tester"],
        "styles": ["terse"],
        "count": count,
        "generator": "openai",
        "openai": {"base_url": url, "model": "fake-model", "api_key_env": "FAKE_OPENAI_KEY",
                   "concurrency": 2, "retries": 3},
        "sandbox": {"timeout_s": 2.0},
    });
    for (k, v) in extra.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

#[test]
fn the_openai_generator_retries_resumes_and_reports_the_yield_per_topic() {
    // SAFETY of the test: the variable name is unique to this test binary's tests.
    std::env::set_var("FAKE_OPENAI_KEY", "sekrit");
    let tmp = tempfile::tempdir().unwrap();
    let server = FakeServer::start(&tmp.path().join("server"), true);
    let params = openai_params(
        &server.url,
        &[
            "topic-correct",
            "topic-wrong",
            "topic-vacuous",
            "topic-poison",
        ],
        4,
        serde_json::json!({}),
    );

    // The poisoned prompt fails for good (500 after every retry): the stage fails, but what
    // was answered is kept.
    let err = run_stage::<Synthesize>(tmp.path(), "synth", params.clone(), &[], 3)
        .err()
        .expect("a prompt the server never answers fails the stage");
    let text = format!("{err:?}");
    assert!(
        text.contains("failed 4 times") && text.contains("HTTP 500"),
        "{text}"
    );
    let first = server.requests();
    // One 429 (Retry-After: 0) and one 503 were retried, not fatal.
    assert!(
        first.contains(&"429".to_string()) && first.contains(&"503".to_string()),
        "{first:?}"
    );
    let answered: Vec<_> = first.iter().filter(|l| l.starts_with("ok ")).collect();
    assert_eq!(answered.len(), 3, "{first:?}");

    // Healed, the rerun asks only for what is missing.
    std::fs::write(server.state.join("healed"), "").unwrap();
    let ran = run_stage::<Synthesize>(tmp.path(), "synth", params, &[], 3).unwrap();
    let second: Vec<_> = server.requests()[first.len()..].to_vec();
    assert_eq!(
        second.len(),
        1,
        "only the unanswered prompt is asked again: {second:?}"
    );
    assert!(second[0].contains("topic-poison"));
    assert_eq!(ran.metadata["resumed_answers"], 3);

    // Verified by execution: the correct exercise is kept, the wrong and vacuous ones are not;
    // the poisoned topic's answer is prose, with no exercise in it.
    let out = &ran.outputs["records"];
    let records = read_jsonl(&out.join("records.jsonl"));
    assert_eq!(records.len(), 1, "{records:?}");
    let fields = &records[0]["fields"];
    assert_eq!(fields["topic"], "topic-correct");
    assert_eq!(fields["audience"], "a tester");
    assert_eq!(fields["entry_point"], "add");
    assert!(fields["instruction"]
        .as_str()
        .unwrap()
        .contains("\"\"\"Return the sum"));
    assert!(fields["tests"]
        .as_str()
        .unwrap()
        .contains("assert add(1, 2) == 3"));
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["prompts"], 4);
    assert_eq!(stats["kept"], 1);
    assert_eq!(stats["dropped"]["solution_fails"], 1);
    assert_eq!(stats["dropped"]["vacuous_tests"], 1);
    assert_eq!(stats["topics"]["topic-correct"]["kept"], 1);
    assert_eq!(stats["topics"]["topic-wrong"]["kept"], 0);
    assert!(stats["examples"]["solution_fails"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("AssertionError"));
    assert!(
        stats.to_string().find("sekrit").is_none(),
        "the key is never written"
    );
}

#[test]
fn refusals_stop_at_once_with_the_servers_message_and_what_to_check() {
    std::env::set_var("FAKE_OPENAI_KEY_WRONG", "not-the-key");
    std::env::set_var("FAKE_OPENAI_KEY", "sekrit");
    let tmp = tempfile::tempdir().unwrap();
    let server = FakeServer::start(&tmp.path().join("server"), false);

    let mut wrong_model = openai_params(&server.url, &["t"], 2, serde_json::json!({}));
    wrong_model["openai"]["model"] = "gpt-nope".into();
    let err = run_stage::<Synthesize>(tmp.path(), "a", wrong_model, &[], 1)
        .err()
        .unwrap();
    let text = format!("{err:?}");
    assert!(
        text.contains("404") && text.contains("`gpt-nope` does not exist"),
        "{text}"
    );
    assert!(
        text.contains("/v1/models"),
        "the help says what to check: {text}"
    );

    let mut wrong_key = openai_params(&server.url, &["t"], 2, serde_json::json!({}));
    wrong_key["openai"]["api_key_env"] = "FAKE_OPENAI_KEY_WRONG".into();
    let err = run_stage::<Synthesize>(tmp.path(), "b", wrong_key, &[], 1)
        .err()
        .unwrap();
    let text = format!("{err:?}");
    assert!(text.contains("401") && text.contains("API key"), "{text}");
    assert!(
        !text.contains("not-the-key"),
        "the key is never shown: {text}"
    );

    let mut unset = openai_params(&server.url, &["t"], 2, serde_json::json!({}));
    unset["openai"]["api_key_env"] = "FAKE_OPENAI_KEY_NEVER_SET".into();
    let err = run_stage::<Synthesize>(tmp.path(), "c", unset, &[], 1)
        .err()
        .unwrap();
    assert!(format!("{err:?}").contains("FAKE_OPENAI_KEY_NEVER_SET"));
    // Refusals are not retried: no request was answered.
    assert!(
        server.requests().iter().all(|l| !l.starts_with("ok")),
        "{:?}",
        server.requests()
    );
}

#[test]
fn the_local_generator_writes_a_record_per_draw_and_resumes_from_its_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_model(&model);
    std::fs::write(
        model.join("tokenizer_config.json"),
        serde_json::json!({
            "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "eos_token": "<|endoftext|>",
        })
        .to_string(),
    )
    .unwrap();
    let params = serde_json::json!({
        "mode": "textbook",
        "topics": ["loops", "recursion", "dictionaries"],
        "audiences": ["a child", "an expert"],
        "count": 5,
        "max_new_tokens": 6,
        "temperature": 0.9,
        "batch_size": 2,
        "min_chars": 0,
    });
    let inputs: &[(&str, &[&Path])] = &[("model", &[model.as_path()])];
    let ran = run_stage::<Synthesize>(tmp.path(), "s", params.clone(), inputs, 11).unwrap();
    let records = read_jsonl(&ran.outputs["records"].join("records.jsonl"));
    assert_eq!(
        records.len() as u64
            + ran
                .metadata
                .get("dropped_too_short")
                .and_then(|v| v.as_u64())
                .unwrap_or(0),
        5
    );
    for r in &records {
        let f = &r["fields"];
        assert!(["loops", "recursion", "dictionaries"].contains(&f["topic"].as_str().unwrap()));
        assert!(["a child", "an expert"].contains(&f["audience"].as_str().unwrap()));
        assert_eq!(f["style"], "clear");
    }
    // Five distinct combinations: the first pass over the product does not repeat one.
    let combos: std::collections::HashSet<_> = records
        .iter()
        .map(|r| {
            (
                r["fields"]["topic"].to_string(),
                r["fields"]["audience"].to_string(),
            )
        })
        .collect();
    assert_eq!(combos.len(), records.len());

    // Rerun on the same checkpoint: every answer is resumed, and the output is identical.
    let again = run_stage::<Synthesize>(tmp.path(), "s", params.clone(), inputs, 11).unwrap();
    assert_eq!(again.metadata["resumed_answers"], 5);
    assert_eq!(
        read_jsonl(&again.outputs["records"].join("records.jsonl")),
        records
    );

    // A fresh run with the same seed writes the same records (answers are seeded per draw).
    let fresh = tempfile::tempdir().unwrap();
    let rerun = run_stage::<Synthesize>(fresh.path(), "s", params, inputs, 11).unwrap();
    assert_eq!(
        read_jsonl(&rerun.outputs["records"].join("records.jsonl")),
        records
    );
}

#[test]
fn a_model_without_a_chat_template_is_refused_with_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    write_tiny_model(&model);
    let params = serde_json::json!({"topics": ["x"], "count": 1, "max_new_tokens": 2});
    let err = run_stage::<Synthesize>(tmp.path(), "s", params, &[("model", &[model.as_path()])], 1)
        .err()
        .unwrap();
    assert!(format!("{err:?}").contains("chat template"), "{err:?}");
}
