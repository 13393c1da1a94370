//! Report rendering: escaping, well-formed SVG/XHTML, numbers present.
//!
//! With `PIPELINE_REPORT_OUT=<dir>` the sample report is also written there
//! (`report.html`, `report.md`) for a visual check.

use pipeline_stages::artifacts::AdapterArtifact;
use pipeline_stages::grade::{compare_paired, CompareOptions, TaskCounts};
use pipeline_stages::report::answer::{
    answer_variant_names, build_answer, render_answer_text, Answer, AnswerKeys, Observation,
};
use pipeline_stages::report::variants::Producer;
use pipeline_stages::report::{
    escape, render_html, render_markdown, svg, CacheKey, CompletionRow, FilterStats, Histogram,
    LossPoint, ReasonCount, ReportData, ScorePoint, VariantCompletion, VariantReport,
};
use pipeline_stages::stats::{Metric, StatsOptions, Verdict};

const EVIL: &str = "<script>alert('x')</script> & \"quotes\"";

fn loss(start: f64, decay: f64) -> Vec<LossPoint> {
    (0..=40)
        .map(|i| LossPoint {
            step: i * 25,
            loss: start * (-(i as f64) * decay).exp() + 0.6 + 0.03 * ((i * 7 % 5) as f64 - 2.0),
        })
        .collect()
}

/// Bits per byte of 60 tasks: `base` once, `clean <v>` with two training seeds each clearly
/// below the base, `messy` with two seeds at the base's level.
fn sample_answer() -> Answer {
    let bpb = |task: usize, shift: f64| 0.5 + 0.01 * (task % 7) as f64 + shift;
    let obs = |base: &str, labels: &[(&str, &str)], shift: f64| Observation {
        producer: Producer::with_labels(base, labels),
        metric: Metric::bits_per_byte(),
        scores: (0..60)
            .map(|t| {
                (
                    format!("HumanEval/{t}"),
                    bpb(t, shift + 0.001 * (t % 3) as f64),
                )
            })
            .collect(),
    };
    let observations = vec![
        obs("likelihood-base", &[("bench", "humaneval")], 0.0),
        obs(
            "likelihood-clean",
            &[("seed", "1"), ("bench", "humaneval")],
            -0.05,
        ),
        obs(
            "likelihood-clean",
            &[("seed", "2"), ("bench", "humaneval")],
            -0.04,
        ),
        obs(
            "likelihood",
            &[("data", "messy"), ("seed", "1"), ("bench", "humaneval")],
            0.002,
        ),
        obs(
            "likelihood",
            &[("data", "messy"), ("seed", "2"), ("bench", "humaneval")],
            -0.002,
        ),
    ];
    let keys = AnswerKeys {
        benchmark: "bench".into(),
        pooled: vec!["seed".into()],
        default_benchmark: "HumanEval".into(),
    };
    build_answer(&observations, &keys, None, &StatsOptions::default())
}

/// The answer pools seeds into one row per data variant, compares each with the base and
/// with each other, and says which is better only where the interval and the test agree.
#[test]
fn the_answer_pools_seeds_and_gives_verdicts() {
    let answer = sample_answer();
    assert!(answer.notes.is_empty(), "{:?}", answer.notes);
    let [table] = answer.benchmarks.as_slice() else {
        panic!("one benchmark expected: {answer:?}")
    };
    assert_eq!(table.benchmark, "humaneval");
    assert_eq!(table.baseline, "base");
    let rows: Vec<(&str, usize)> = table
        .rows
        .iter()
        .map(|r| (r.variant.as_str(), r.cells[0].as_ref().unwrap().seeds))
        .collect();
    assert_eq!(rows, [("base", 1), ("clean", 2), ("messy", 2)]);
    let clean = table.rows[1].cells[0].as_ref().unwrap();
    let base = table.rows[0].cells[0].as_ref().unwrap();
    assert!(
        (base.mean - clean.mean - 0.045).abs() < 1e-9,
        "{base:?} {clean:?}"
    );
    assert!(clean.ci_low < clean.mean && clean.mean < clean.ci_high);
    let verdict = |a: &str, b: &str| {
        table
            .comparisons
            .iter()
            .find(|c| c.a == a && c.b == b)
            .map(|c| c.verdict)
            .unwrap()
    };
    assert_eq!(verdict("base", "clean"), Verdict::Better);
    assert_eq!(verdict("clean", "messy"), Verdict::Worse);
    assert_eq!(verdict("base", "messy"), Verdict::NoDifference);

    // A baseline named through the stage that produced it resolves to its variant.
    let observations_baseline = {
        let keys = AnswerKeys {
            benchmark: "bench".into(),
            pooled: vec!["seed".into()],
            default_benchmark: "HumanEval".into(),
        };
        let obs = vec![
            Observation {
                producer: Producer::plain("likelihood-base"),
                metric: Metric::bits_per_byte(),
                scores: vec![("t".into(), 0.5)],
            },
            Observation {
                producer: Producer::with_labels("likelihood-clean", &[("seed", "1")]),
                metric: Metric::bits_per_byte(),
                scores: vec![("t".into(), 0.4)],
            },
        ];
        build_answer(
            &obs,
            &keys,
            Some("likelihood-clean@1"),
            &StatsOptions::default(),
        )
    };
    assert_eq!(observations_baseline.benchmarks[0].baseline, "clean");

    let text = render_answer_text(&answer);
    assert!(
        text.contains("bits/byte (lower is better; 60 tasks)"),
        "{text}"
    );
    assert!(text.contains("clean beats base on bits/byte"), "{text}");
    let data = ReportData {
        answer,
        ..Default::default()
    };
    let md = render_markdown(&data);
    assert!(md.contains("## The answer: humaneval"), "{md}");
    assert!(md.contains("| clean | 2 | 0."), "{md}");
    assert!(render_html(&data).contains("<h2>The answer: humaneval</h2>"));
}

/// Variants are named alike across stage kinds that follow the manifests' naming, so one
/// row gathers a variant's likelihood and pass@1.
#[test]
fn answer_variant_names_match_across_kinds() {
    let producers = [
        Producer::plain("grade-greedy-base"),
        Producer::with_labels("grade-greedy-textbook", &[("seed", "1")]),
        Producer::with_labels("grade-greedy", &[("data", "messy"), ("seed", "1")]),
        Producer::with_labels("grade-base", &[("bench", "humaneval")]),
        Producer::plain("likelihood-base"),
        Producer::with_labels("likelihood-textbook", &[("seed", "2")]),
        Producer::with_labels("likelihood", &[("data", "messy"), ("seed", "2")]),
        Producer::plain("likelihood-nf4"),
        // Scored under training templates (smollm2-quality.toml's names).
        Producer::plain("likelihood-instruction-base"),
        Producer::with_labels("likelihood-instruction-textbook", &[("seed", "1")]),
        Producer::plain("likelihood-snippet-base"),
        Producer::with_labels("likelihood-snippet", &[("data", "filtered"), ("seed", "1")]),
    ];
    let dropped = ["seed".to_string(), "bench".to_string()];
    let names = answer_variant_names(&producers, &dropped);
    assert_eq!(
        names,
        [
            "base", "textbook", "messy", "base", "base", "textbook", "messy", "nf4", "base",
            "textbook", "base", "filtered"
        ]
    );
}

/// smollm2-quality.toml with one chain for every data variant (a table-valued `matrix.data`):
/// the variants keep the names they had as separate `-textbook` tables.
#[test]
fn one_chain_for_all_variants_keeps_the_variant_names() {
    let producers = [
        Producer::plain("grade-greedy-base"),
        Producer::with_labels("grade-greedy", &[("data", "textbook"), ("seed", "1")]),
        Producer::with_labels("grade-greedy", &[("data", "messy"), ("seed", "1")]),
        Producer::with_labels("likelihood-base", &[("bench", "humaneval")]),
        Producer::with_labels(
            "likelihood",
            &[("data", "textbook"), ("seed", "2"), ("bench", "humaneval")],
        ),
        Producer::with_labels(
            "likelihood",
            &[("data", "filtered"), ("seed", "2"), ("bench", "humaneval")],
        ),
        Producer::plain("likelihood-nf4"),
        Producer::plain("likelihood-instruction-base"),
        Producer::with_labels(
            "likelihood-instruction",
            &[("data", "textbook"), ("seed", "1")],
        ),
        Producer::plain("likelihood-snippet-base"),
        Producer::with_labels("likelihood-snippet", &[("data", "messy"), ("seed", "1")]),
        // Sampled pass@k beside the greedy pass@1: the same rows.
        Producer::plain("grade-sampled-base"),
        Producer::with_labels("grade-sampled", &[("data", "filtered"), ("seed", "2")]),
    ];
    let dropped = ["seed".to_string(), "bench".to_string()];
    assert_eq!(
        answer_variant_names(&producers, &dropped),
        [
            "base", "textbook", "messy", "base", "textbook", "filtered", "nf4", "base", "textbook",
            "base", "messy", "base", "filtered"
        ]
    );
}

/// Likelihoods of problems framed in a training template are a metric of their own: the
/// report kind names the column after the template (from the likelihood summary), puts each
/// score in the row of the same variant as its benchmark-framed score (`likelihood-snippet-base`
/// and `likelihood-base` are both `base`), and compares variants only within a column: the
/// textbook adapter with the base under the `instruction` template, the raw-code adapter with
/// the base under `code_snippet`.
#[test]
fn template_framed_likelihoods_are_their_own_labeled_column() {
    use std::collections::BTreeMap;

    use pipeline_engine::stage::InputArtifact;
    use pipeline_engine::{Stage, StageContext};
    use pipeline_stages::artifacts::{
        LikelihoodArtifact, LikelihoodSummary, ReportArtifact, TaskLikelihood,
    };
    use pipeline_stages::kinds::report::{Report, ReportParams};
    use pipeline_stages::templates::TemplateSpec;

    let tmp = tempfile::tempdir().unwrap();
    let scores = |base: &str, labels: &[(&str, &str)], template: Option<&str>, shift: f64| {
        let dir = tmp.path().join(format!("{base}{}", labels.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows: Vec<TaskLikelihood> = (0..40)
            .map(|t| {
                let bpb = 0.5 + 0.01 * (t % 7) as f64 + 0.001 * (t % 3) as f64 + shift;
                TaskLikelihood {
                    task_id: format!("HumanEval/{t}"),
                    nll: bpb * std::f64::consts::LN_2 * 100.0,
                    tokens: 30,
                    bytes: 100,
                    bits_per_byte: bpb,
                    prompt_tokens: 20,
                }
            })
            .collect();
        let summary = LikelihoodSummary {
            prompt_style: if template.is_some() {
                "template"
            } else {
                "completion"
            }
            .into(),
            template: template.map(|name| TemplateSpec {
                name: name.into(),
                ..Default::default()
            }),
            adapter: !base.ends_with("base"),
            tasks: rows.len(),
            skipped_without_solution: 0,
            mean_bits_per_byte: 0.5,
            pooled_bits_per_byte: 0.5,
            nats_per_token: 1.0,
            tokens: 30 * rows.len(),
        };
        LikelihoodArtifact::write(&dir, &rows, &summary).unwrap();
        let producer = Producer::with_labels(base, labels);
        InputArtifact {
            stage: producer.instance_name(),
            output: "scores".into(),
            path: dir,
            tree: String::new(),
            base: base.into(),
            labels: producer.labels,
        }
    };
    let bench = ("bench", "humaneval");
    let likelihoods = vec![
        scores("likelihood-base", &[bench], None, 0.0),
        scores("likelihood-textbook", &[("seed", "1"), bench], None, -0.01),
        scores(
            "likelihood",
            &[("data", "messy"), ("seed", "1"), bench],
            None,
            -0.02,
        ),
        // Scored on `evals@humaneval`: no benchmark value, so the report's benchmark.
        scores("likelihood-instruction-base", &[], Some("instruction"), 0.1),
        scores(
            "likelihood-instruction-textbook",
            &[("seed", "1")],
            Some("instruction"),
            0.05,
        ),
        scores("likelihood-snippet-base", &[], Some("code_snippet"), 0.03),
        scores(
            "likelihood-snippet",
            &[("data", "messy"), ("seed", "1")],
            Some("code_snippet"),
            0.01,
        ),
    ];
    let out = tmp.path().join("report");
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageContext::standalone_with_artifacts(
        "report",
        0,
        BTreeMap::from([("likelihoods".to_string(), likelihoods)]),
        BTreeMap::from([("report".to_string(), out.clone())]),
        tmp.path().join("ckpt"),
    );
    let params = ReportParams {
        benchmark: "humaneval".into(),
        baseline: Some("base".into()),
        ..Default::default()
    };
    Report::run(&params, &mut ctx).unwrap();

    let data: ReportData = serde_json::from_str(
        &std::fs::read_to_string(out.join(ReportArtifact::DATA_FILE)).unwrap(),
    )
    .unwrap();
    let answer = &data.answer;
    assert!(answer.notes.is_empty(), "{:?}", answer.notes);
    let [table] = answer.benchmarks.as_slice() else {
        panic!("one benchmark expected: {answer:?}")
    };
    assert_eq!(table.benchmark, "humaneval");
    let metrics: Vec<&str> = table.metrics.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        metrics,
        [
            "bits/byte",
            "bits/byte (instruction template)",
            "bits/byte (code_snippet template)"
        ]
    );
    let rows: Vec<(&str, Vec<bool>)> = table
        .rows
        .iter()
        .map(|r| {
            (
                r.variant.as_str(),
                r.cells.iter().map(Option::is_some).collect(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("base", vec![true, true, true]),
            ("textbook", vec![true, true, false]),
            ("messy", vec![true, false, true]),
        ]
    );
    let pairs = |metric: &str| -> Vec<(&str, &str)> {
        table
            .comparisons
            .iter()
            .filter(|c| c.metric.name == metric)
            .map(|c| (c.a.as_str(), c.b.as_str()))
            .collect()
    };
    assert_eq!(pairs("bits/byte").len(), 3);
    assert_eq!(
        pairs("bits/byte (instruction template)"),
        [("base", "textbook")]
    );
    assert_eq!(
        pairs("bits/byte (code_snippet template)"),
        [("base", "messy")]
    );
    let base_instruction = table.rows[0].cells[1].as_ref().unwrap();
    assert!((base_instruction.mean - (0.5 + 0.03 + 0.001 + 0.1)).abs() < 0.01);

    let text = std::fs::read_to_string(out.join(ReportArtifact::ANSWER_FILE)).unwrap();
    assert!(
        text.contains("bits/byte (instruction template) (lower is better; 40 tasks)"),
        "{text}"
    );
    assert!(
        text.contains("textbook beats base on bits/byte (instruction template)"),
        "{text}"
    );
    assert!(
        text.contains("messy beats base on bits/byte (code_snippet template)"),
        "{text}"
    );
    let md = std::fs::read_to_string(out.join(ReportArtifact::MARKDOWN_FILE)).unwrap();
    assert!(md.contains("bits/byte (code_snippet template)"), "{md}");
}

fn sample() -> ReportData {
    let tasks = |pattern: &dyn Fn(usize) -> u64| -> Vec<TaskCounts> {
        (0..164)
            .map(|i| TaskCounts {
                task_id: format!("HumanEval/{i}"),
                n: 1,
                c: pattern(i),
            })
            .collect()
    };
    let base = tasks(&|i| (i % 9 == 0) as u64);
    let clean = tasks(&|i| (i % 9 == 0 || i % 7 == 0) as u64);
    let messy = tasks(&|i| (i % 9 == 0 || i % 31 == 0) as u64);
    let opts = CompareOptions::default();
    ReportData {
        answer: sample_answer(),
        completions_note: "1 of 164 tasks every variant answered; the 1 where the variants disagree (some passed, some failed) come first.".into(),
        title: "Textbooks replication: clean vs messy <data>".into(),
        summary: "SmolLM2-135M fine-tuned with QLoRA on 1,000 CodeAlpaca rows (clean) vs 5,000 GitHub files (messy).".into(),
        variants: vec![
            VariantReport {
                name: "base".into(),
                benchmark: "HumanEval".into(),
                pass_at_k: vec![ScorePoint { k: 1, value: 0.1159, ci_low: Some(0.0671), ci_high: Some(0.1646) }],
                tasks: 164,
                samples: 164,
                loss: vec![], held_out_loss: None },
            VariantReport {
                name: "clean".into(),
                benchmark: "HumanEval".into(),
                pass_at_k: vec![
                    ScorePoint { k: 1, value: 0.2134, ci_low: Some(0.1524), ci_high: Some(0.2805) },
                    ScorePoint { k: 10, value: 0.3871, ci_low: None, ci_high: None },
                ],
                tasks: 164,
                samples: 1640,
                loss: loss(1.4, 0.08), held_out_loss: None },
            VariantReport {
                name: EVIL.into(),
                benchmark: "HumanEval".into(),
                pass_at_k: vec![ScorePoint { k: 1, value: 0.1402, ci_low: Some(0.0915), ci_high: Some(0.1951) }],
                tasks: 164,
                samples: 164,
                loss: loss(1.9, 0.05), held_out_loss: None },
        ],
        comparisons: vec![
            compare_paired("base", &base, "clean", &clean, &opts).unwrap(),
            compare_paired("base", &base, "messy", &messy, &opts).unwrap(),
        ],
        data: vec![],
        contamination: vec![pipeline_stages::report::contamination::ContaminationTable {
            benchmark: "HumanEval".into(),
            measure: pipeline_stages::similarity::Measure::Ast,
            rows: vec![pipeline_stages::report::contamination::ContaminationRow {
                variant: EVIL.into(),
                metric: pipeline_stages::stats::Metric::pass_at_1(),
                threshold: 0.8,
                similar: pipeline_stages::report::contamination::Bucket { tasks: 0, estimate: None, vs_baseline: None },
                other: pipeline_stages::report::contamination::Bucket {
                    tasks: 164,
                    estimate: Some(pipeline_stages::stats::Estimate {
                        mean: 0.1402,
                        ci_low: 0.0915,
                        ci_high: 0.1951,
                        confidence: 0.95,
                        tasks: 164,
                        seeds: 1,
                        per_seed_means: vec![0.1402],
                    }),
                    vs_baseline: None,
                },
            }],
        }],
        nearest: vec![pipeline_stages::report::contamination::NearestExample {
            source: "similarity@messy,humaneval".into(),
            measure: pipeline_stages::similarity::Measure::Embedding,
            task_id: "HumanEval/0".into(),
            record: "files.jsonl:17".into(),
            score: 0.912,
            excerpt: EVIL.into(),
        }],
        filters: vec![FilterStats {
            dataset: "messy GitHub files".into(),
            total: 5000,
            kept: 3127,
            reasons: vec![
                ReasonCount { reason: "too_long".into(), count: 912 },
                ReasonCount { reason: "low_quality_score".into(), count: 803 },
                ReasonCount { reason: EVIL.into(), count: 158 },
            ],
            histograms: vec![Histogram {
                title: "quality score".into(),
                edges: (0..=10).map(|i| i as f64 / 10.0).collect(),
                counts: vec![120, 340, 610, 820, 905, 770, 640, 420, 260, 115],
                threshold: Some(0.35),
            }],
        }],
        completions: vec![CompletionRow {
            task_id: "HumanEval/0".into(),
            prompt: "def has_close_elements(numbers, threshold):\n    \"\"\"Check if any two numbers are closer than threshold.\"\"\"\n".into(),
            completions: vec![
                VariantCompletion { variant: "base".into(), completion: "    return False\n".into(), passed: Some(false), outcome: "AssertionError".into() },
                VariantCompletion {
                    variant: "clean".into(),
                    completion: "    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n            if abs(a - b) < threshold:\n                return True\n    return False\n".into(),
                    passed: Some(true),
                    outcome: String::new(),
                },
                VariantCompletion { variant: EVIL.into(), completion: "    return 1 < 2 && </pre><img src=x onerror=alert(1)>\n".into(), passed: None, outcome: String::new() },
            ],
        }],
        manifest: "[stage.grade]\nkind = \"grade\"\nsamples = \"<generate.clean>\"\n".into(),
        cache_keys: vec![
            CacheKey { stage: "generate.clean".into(), key: "b3:7f9c2a<&>".into() },
            CacheKey { stage: "grade.clean".into(), key: "b3:01d4e8".into() },
        ],
    }
}

#[test]
fn escape_covers_markup() {
    assert_eq!(
        escape("<a href=\"x\">'&'</a>"),
        "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
    );
    assert_eq!(escape("a\u{1}b"), "a\\x01b");
}

#[test]
fn html_is_escaped_and_well_formed() {
    let data = sample();
    let html = render_html(&data);
    assert!(!html.contains("<script>"), "raw script tag leaked");
    assert!(!html.contains("<img"), "raw img tag leaked");
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    assert!(html.contains("b3:7f9c2a&lt;&amp;&gt;"));
    // No external assets.
    for bad in ["src=\"http", "href=\"http", "<link", "url(", "@import"] {
        assert!(!html.contains(bad), "external reference {bad}");
    }
    // The whole page parses as XML (XHTML syntax), which implies every SVG does too.
    let doc = roxmltree::Document::parse_with_options(
        &html,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("HTML is not well-formed: {e}"));
    let svgs: Vec<_> = doc
        .descendants()
        .filter(|n| n.tag_name().name() == "svg")
        .collect();
    // pass@k, loss, reasons, histogram.
    assert_eq!(svgs.len(), 4);
    // Every bar of the histogram is drawn.
    let hist = svgs
        .iter()
        .find(|s| s.attribute("aria-label") == Some("quality score"))
        .unwrap();
    let bars = hist
        .descendants()
        .filter(|n| n.tag_name().name() == "rect")
        .count();
    assert_eq!(bars, 10);
    // Error bars: one path per variant with a CI.
    let passk = svgs
        .iter()
        .find(|s| s.attribute("aria-label") == Some("pass@k per variant"))
        .unwrap();
    let whiskers = passk
        .descendants()
        .filter(|n| n.tag_name().name() == "path")
        .count();
    assert_eq!(whiskers, 3);
    // One column per variant in the side-by-side completions.
    assert!(html.contains("repeat(3, minmax(0, 1fr))"));
    // The contamination table and the nearest records, escaped like everything else.
    assert!(
        html.contains("<h3>HumanEval, split by AST match rate</h3>"),
        "{html}"
    );
    assert!(html.contains("14.0% [9.2%, 19.5%] (n=164)"));
    assert!(html.contains("– (n=0)"));
    assert!(html.contains("files.jsonl:17"));
    let md = render_markdown(&data);
    assert!(
        md.contains("## Is the gain in the tasks the data resembles?"),
        "{md}"
    );
    assert!(
        md.contains("| ≥ 0.8 | – (n=0) | – | 14.0% [9.2%, 19.5%] (n=164) | – |"),
        "{md}"
    );
}

fn loss_series(data: &ReportData) -> Vec<(&str, &[LossPoint])> {
    data.variants
        .iter()
        .map(|v| (v.name.as_str(), v.loss.as_slice()))
        .collect()
}

#[test]
fn each_svg_parses_on_its_own() {
    let data = sample();
    let charts = [
        svg::pass_at_k_chart(&data.variants),
        svg::loss_chart("training loss", &loss_series(&data)).unwrap(),
        svg::histogram_chart(&data.filters[0].histograms[0]),
        svg::reasons_chart(&data.filters[0]),
        svg::histogram_chart(&Histogram {
            title: "broken".into(),
            edges: vec![0.0],
            counts: vec![1, 2],
            threshold: None,
        }),
    ];
    for c in &charts {
        let doc = roxmltree::Document::parse(c).unwrap_or_else(|e| panic!("{e}\n{c}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
    }
    assert!(svg::loss_chart("training loss", &loss_series(&data)[..1]).is_none());
}

#[test]
fn numbers_appear() {
    let data = sample();
    let html = render_html(&data);
    let md = render_markdown(&data);
    for text in [&html, &md] {
        for n in [
            "21.3%", "11.6%", "15.2%", "28.1%", "38.7%", "3127", "5000", "912",
        ] {
            assert!(text.contains(n), "{n} missing");
        }
        // p-values: the significant one is tiny, the other is printed with 3 decimals.
        assert!(text.contains("&lt; 0.001"), "tiny p-value missing");
        assert!(text.contains(&format!("{:.3}", data.comparisons[1].p_value)));
        assert!(text.contains("mcnemar_exact"));
    }
    assert!(
        md.contains(&escape(&data.comparisons[0].verdict).replace("&#39;", "'"))
            || md.contains(&data.comparisons[0].verdict)
    );
    assert!(md.contains("| clean | HumanEval | 164 | 1640 | 21.3% [15.2%, 28.1%] | 38.7% |"));
    // Markdown table cells cannot be broken by pipes or tags in names.
    assert!(md.contains("&lt;script&gt;"));
    assert!(!md.contains("<script>"));
    // A completion containing a fence does not end its code block early.
    let mut d2 = data.clone();
    d2.completions[0].completions[0].completion = "x = '''\n```\n'''\n".into();
    assert!(render_markdown(&d2).contains("````python"));

    if let Ok(dir) = std::env::var("PIPELINE_REPORT_OUT") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/report.html"), &html).unwrap();
        std::fs::write(format!("{dir}/report.md"), &md).unwrap();
    }
}

#[test]
fn loss_curve_reads_metrics_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("metrics.jsonl");
    std::fs::write(
        &p,
        "{\"step\": 1, \"loss\": 2.5, \"lr\": 0.001}\n\n{\"step\": 2, \"eval_loss\": 2.0}\n{\"step\": 3, \"loss\": 1.5}\n",
    )
    .unwrap();
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        AdapterArtifact::read_loss_curve(empty.path()).unwrap(),
        None
    );
    let c = AdapterArtifact::read_loss_curve(dir.path())
        .unwrap()
        .unwrap();
    assert_eq!(
        c,
        vec![
            LossPoint { step: 1, loss: 2.5 },
            LossPoint { step: 3, loss: 1.5 }
        ]
    );
    std::fs::write(&p, "not json\n").unwrap();
    let err = AdapterArtifact::read_loss_curve(dir.path()).unwrap_err();
    assert!(format!("{err}").contains("line 1"), "{err}");
}

#[test]
fn a_one_point_series_is_marked_and_a_long_one_is_a_bare_line() {
    let long = loss(3.0, 0.9);
    let one = [LossPoint { step: 4, loss: 2.0 }];
    let chart = svg::loss_chart("loss", &[("training", &long), ("held-out", &one)]).unwrap();
    let doc = roxmltree::Document::parse(&chart).unwrap_or_else(|e| panic!("{e}\n{chart}"));
    let circles: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name("circle"))
        .collect();
    // 41 training points draw a bare line; the lone held-out point gets the only marker.
    assert_eq!((long.len(), circles.len()), (41, 1));
    assert!(chart.contains("held-out: step 4"));
    assert!(chart.contains(">training<") && chart.contains(">held-out<"));
}

#[test]
fn variant_from_grade_has_cis_and_rows() {
    use pipeline_stages::grade::{passk, GradeReport, Isolation, Problem, SampleResult, Status};
    use pipeline_stages::report::{completion_rows, pass_at_k_ci};
    let mut results = Vec::new();
    let mut tasks = Vec::new();
    for t in 0..20u64 {
        for s in 0..10u64 {
            let passed = s < t / 2;
            results.push(SampleResult {
                task_id: format!("T/{t}"),
                completion: format!("    return {s}\n"),
                passed,
                result: if passed {
                    "passed".into()
                } else {
                    "failed: ".into()
                },
                status: if passed {
                    Status::Passed
                } else {
                    Status::Failed
                },
                error: None,
                duration_s: 0.1,
                extra: Default::default(),
            });
        }
        tasks.push(TaskCounts {
            task_id: format!("T/{t}"),
            n: 10,
            c: t / 2,
        });
    }
    let grade = GradeReport {
        pass_at_k: passk::summarize(&tasks, &[1, 10, 100]),
        results,
        tasks: tasks.clone(),
        tasks_without_samples: 0,
        status_counts: Default::default(),
        isolation: Isolation::default(),
        python: "python3".into(),
    };
    let v = VariantReport::from_grade("clean", "HumanEval", &grade, vec![]);
    assert_eq!(
        v.pass_at_k.iter().map(|p| p.k).collect::<Vec<_>>(),
        vec![1, 10]
    );
    let p1 = v.pass_at_k[0];
    // Mean of c/n = mean(t/2)/10 over t in 0..20 = 4.5 / 10.
    assert!((p1.value - 0.45).abs() < 1e-12);
    let (lo, hi) = (p1.ci_low.unwrap(), p1.ci_high.unwrap());
    assert!(lo < 0.45 && 0.45 < hi && lo > 0.2 && hi < 0.7, "{lo} {hi}");
    // Degenerate data: no spread, CI collapses to the value.
    let all = vec![
        TaskCounts {
            task_id: "a".into(),
            n: 1,
            c: 1
        };
        5
    ];
    assert_eq!(pass_at_k_ci(&all, 1, 1000, 0.95, 0), Some((1.0, 1.0)));
    assert_eq!(pass_at_k_ci(&all, 2, 1000, 0.95, 0), None);

    let problems: Vec<Problem> = (0..3)
        .map(|t| Problem {
            task_id: format!("T/{t}"),
            prompt: format!("def f{t}():\n"),
            test: String::new(),
            entry_point: format!("f{t}"),
        })
        .collect();
    let (rows, note) = completion_rows(&problems, &[("a", &grade), ("b", &grade)], 2);
    assert_eq!(rows.len(), 2);
    assert_eq!(note, "2 of 3 tasks every variant answered; the 0 where the variants disagree (some passed, some failed) come first.");
    assert_eq!(rows[1].completions.len(), 2);
    assert_eq!(rows[1].completions[1].variant, "b");
    assert_eq!(rows[1].completions[0].completion, "    return 0\n");

    // Where the variants disagree comes first, with why the failing one failed.
    let mut worse = grade.clone();
    let first_of_t2 = worse
        .results
        .iter_mut()
        .find(|r| r.task_id == "T/2")
        .unwrap();
    first_of_t2.passed = false;
    first_of_t2.status = Status::Failed;
    first_of_t2.error = Some("AssertionError: expected 2".into());
    first_of_t2
        .extra
        .insert("finish_reason".into(), serde_json::json!("length"));
    first_of_t2
        .extra
        .insert("generated_tokens".into(), serde_json::json!(256));
    let (rows, note) = completion_rows(&problems, &[("a", &grade), ("b", &worse)], 2);
    assert_eq!(rows[0].task_id, "T/2");
    assert!(note.contains("the 1 where the variants disagree"), "{note}");
    assert_eq!(rows[0].completions[0].outcome, "");
    assert_eq!(
        rows[0].completions[1].outcome,
        "AssertionError; stopped after 256 tokens"
    );
}

/// `data-stats` measures each variant on the text its template renders, and a report given
/// them as `data` shows the variants side by side: a corpus of one repeated record has low
/// distinct-n, a high compression ratio and duplicate rates where a varied one has none.
#[test]
fn data_variants_are_measured_and_shown_side_by_side() {
    use std::collections::BTreeMap;

    use pipeline_engine::stage::InputArtifact;
    use pipeline_engine::{Stage, StageContext};
    use pipeline_stages::artifacts::{DataStatsArtifact, RecordsArtifact, ReportArtifact};
    use pipeline_stages::kinds::data_stats::{DataStatsKind, DataStatsParams};
    use pipeline_stages::kinds::report::{Report, ReportParams};
    use pipeline_stages::records::{Provenance, Record};
    use pipeline_stages::templates::TemplateSpec;

    let tmp = tempfile::tempdir().unwrap();
    let artifact = |name: &str, path: std::path::PathBuf, labels: &[(&str, &str)]| InputArtifact {
        stage: name.into(),
        output: "out".into(),
        path,
        tree: String::new(),
        base: name.split('@').next().unwrap_or(name).into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut stats_inputs = Vec::new();
    for (variant, varied) in [("varied", true), ("repeated", false)] {
        let records: Vec<Record> = (0..60)
            .map(|i| {
                let i = if varied { i } else { 0 };
                Record::new(
                    [
                        (
                            "content",
                            format!(
                                "def f{i}(a{i}):\n    return a{i} * {} + {}\n",
                                i * 3 + 1,
                                i % 7
                            ),
                        ),
                        // As synthesize records its draws: three topics evenly, or one.
                        ("topic", ["loops", "recursion", "sets"][i % 3].to_string()),
                    ]
                    .into_iter()
                    .collect(),
                    Provenance::default(),
                )
            })
            .collect();
        let rec_dir = tmp.path().join(format!("records-{variant}"));
        std::fs::create_dir_all(&rec_dir).unwrap();
        RecordsArtifact::write(&rec_dir, &records, &serde_json::json!({})).unwrap();
        let out = tmp.path().join(format!("stats-{variant}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut ctx = StageContext::standalone_with_artifacts(
            "data-stats",
            0,
            BTreeMap::from([(
                "records".to_string(),
                vec![artifact("records", rec_dir, &[])],
            )]),
            BTreeMap::from([("stats".to_string(), out.clone())]),
            tmp.path().join("ckpt"),
        );
        let params = DataStatsParams {
            template: TemplateSpec {
                name: "code_snippet".into(),
                ..Default::default()
            },
            dispersion_sample: 40,
            cluster_threshold: 0.9,
            // The embedding dispersion, with the real MiniLM (scripts/fetch-test-assets.sh).
            model_dir: std::env::var_os("PIPELINE_MINILM_DIR").map(std::path::PathBuf::from),
            coverage_fields: vec!["topic".into(), "audience".into()],
        };
        DataStatsKind::run(&params, &mut ctx).unwrap();
        let stats = DataStatsArtifact::read(&out).unwrap();
        assert_eq!(stats.stats.records, 60);
        assert!(
            stats.rendered_as.contains("code_snippet"),
            "{}",
            stats.rendered_as
        );
        stats_inputs.push(artifact(
            &format!("data-stats@{variant}"),
            out,
            &[("data", variant)],
        ));
    }
    let varied = DataStatsArtifact::read(&stats_inputs[0].path)
        .unwrap()
        .stats;
    let repeated = DataStatsArtifact::read(&stats_inputs[1].path)
        .unwrap()
        .stats;
    assert!(
        varied.distinct_n[3] > 0.5 && repeated.distinct_n[3] < 0.05,
        "{varied:?} {repeated:?}"
    );
    assert!(repeated.compression_ratio > 3.0 * varied.compression_ratio);
    assert_eq!(varied.exact_duplicate_rate, 0.0);
    assert!(repeated.exact_duplicate_rate > 0.95);
    let (v, r) = (
        varied
            .embedding
            .as_ref()
            .expect("dispersion of the varied corpus"),
        repeated
            .embedding
            .as_ref()
            .expect("dispersion of the repeated corpus"),
    );
    assert_eq!(v.sample, 40);
    assert!(r.clusters < 5 && v.clusters > r.clusters, "{v:?} {r:?}");
    assert!(
        v.mean_cosine_distance > r.mean_cosine_distance + 0.05,
        "{v:?} {r:?}"
    );

    let out = tmp.path().join("report");
    std::fs::create_dir_all(&out).unwrap();
    let mut ctx = StageContext::standalone_with_artifacts(
        "report",
        0,
        BTreeMap::from([("data".to_string(), stats_inputs)]),
        BTreeMap::from([("report".to_string(), out.clone())]),
        tmp.path().join("ckpt2"),
    );
    Report::run(&ReportParams::default(), &mut ctx).unwrap();
    let md = std::fs::read_to_string(out.join(ReportArtifact::MARKDOWN_FILE)).unwrap();
    assert!(md.contains("## The data"), "{md}");
    let row = |variant: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {variant} |")))
            .unwrap_or_else(|| panic!("no row for {variant}: {md}"))
            .to_string()
    };
    assert!(row("varied").contains("| 60 |"), "{md}");
    assert!(
        row("repeated").contains("| 98.3% | 98.3% |"),
        "{}",
        row("repeated")
    );
    // Coverage of the records' topics (no record names an audience: no row for it).
    assert!(
        md.contains("| varied | topic | 3 | 20 to 20 | 1.00 |"),
        "{md}"
    );
    assert!(
        md.contains("| repeated | topic | 1 | 60 to 60 | 1.00 |"),
        "{md}"
    );
    assert!(!md.contains("| audience |"), "{md}");
    let html = std::fs::read_to_string(out.join(ReportArtifact::HTML_FILE)).unwrap();
    assert!(html.contains("<h2>The data</h2>"));
    assert!(html.contains("<td>topic</td><td>3</td>"), "{html}");
}
