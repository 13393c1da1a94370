//! Reader tests: every format, the error policy, field mapping, and the shared data.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pipeline_stages::readers::{read_source, ErrorPolicy, Format, ReadError, ReadOptions};
use pipeline_stages::records::Fields;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn mapping(pairs: &[(&str, &str)]) -> Fields {
    pairs.iter().map(|(a, b)| (*a, *b)).collect()
}

const JSONL: &str = "{\"b\": \"x\", \"a\": 1, \"l\": [1, \"t\"], \"n\": null}\n\n{\"b\": \"y\\u00e9\", \"a\": 2.5, \"l\": [], \"n\": true}\r\n";

#[test]
fn jsonl_keeps_order_converts_values_and_lines() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.jsonl", JSONL.as_bytes());
    let (recs, stats) = read_source(&p, &ReadOptions::default()).unwrap();
    assert_eq!(stats.format, Some(Format::Jsonl));
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[0].fields.names().collect::<Vec<_>>(),
        ["b", "a", "l", "n"]
    );
    assert_eq!(recs[0].get("a"), Some("1"));
    assert_eq!(recs[0].get("l"), Some("[1,\"t\"]"));
    assert_eq!(recs[0].get("n"), Some(""));
    assert_eq!(recs[1].get("b"), Some("yé"));
    assert_eq!(recs[1].get("n"), Some("true"));
    assert_eq!(recs[0].provenance.line, Some(1));
    // The blank line still counts, so provenance points at the real line.
    assert_eq!(recs[1].provenance.line, Some(3));
}

#[test]
fn json_array_and_gzip_variants_agree() {
    let d = tempfile::tempdir().unwrap();
    let array = r#"  [ {"instruction": "i1", "input": "", "output": "o1"},
    {"instruction": "i2", "input": "in2", "output": "o2"} ]"#;
    let lines = "{\"instruction\": \"i1\", \"input\": \"\", \"output\": \"o1\"}\n{\"instruction\": \"i2\", \"input\": \"in2\", \"output\": \"o2\"}\n";
    let paths = [
        write(d.path(), "a.json", array.as_bytes()),
        write(d.path(), "a.json.gz", &gzip(array.as_bytes())),
        write(d.path(), "b.jsonl", lines.as_bytes()),
        write(d.path(), "b.jsonl.gz", &gzip(lines.as_bytes())),
        // Extension says nothing; content sniffing decides.
        write(d.path(), "c.data", &gzip(array.as_bytes())),
    ];
    let expect_formats = [
        Format::Json,
        Format::Json,
        Format::Jsonl,
        Format::Jsonl,
        Format::Json,
    ];
    for (p, f) in paths.iter().zip(expect_formats) {
        let (recs, stats) = read_source(p, &ReadOptions::default()).unwrap();
        assert_eq!(stats.format, Some(f), "{}", p.display());
        let flat: Vec<Vec<(String, String)>> = recs
            .iter()
            .map(|r| r.fields.iter().map(|(a, b)| (a.into(), b.into())).collect())
            .collect();
        assert_eq!(
            flat[1][1],
            ("input".to_string(), "in2".to_string()),
            "{}",
            p.display()
        );
        assert_eq!(flat.len(), 2);
    }
    let (recs, _) = read_source(&paths[0], &ReadOptions::default()).unwrap();
    assert_eq!(recs[1].provenance.row, Some(1));
}

#[test]
fn mapping_renames_selects_and_limits() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.jsonl", JSONL.as_bytes());
    let opts = ReadOptions {
        fields: mapping(&[("text", "b"), ("num", "a")]),
        limit: Some(1),
        ..Default::default()
    };
    let (recs, stats) = read_source(&p, &opts).unwrap();
    assert_eq!(recs.len(), 1);
    assert!(stats.limit_reached);
    assert_eq!(
        recs[0].fields.iter().collect::<Vec<_>>(),
        [("text", "x"), ("num", "1")]
    );
}

#[test]
fn missing_field_names_available_fields() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "x.jsonl", JSONL.as_bytes());
    let opts = ReadOptions {
        fields: mapping(&[("text", "content")]),
        ..Default::default()
    };
    match read_source(&p, &opts).unwrap_err() {
        ReadError::MissingField {
            field,
            available,
            location,
            ..
        } => {
            assert_eq!(field, "content");
            assert_eq!(available, "b, a, l, n");
            assert!(location.ends_with("x.jsonl:1"), "{location}");
        }
        e => panic!("unexpected {e:?}"),
    }
    // Skipping every record leaves nothing: the Empty error carries the reason.
    let opts = ReadOptions {
        on_error: ErrorPolicy::Skip,
        ..opts
    };
    match read_source(&p, &opts).unwrap_err() {
        ReadError::Empty { hint, .. } => {
            assert!(hint.contains("all 2 records were skipped"), "{hint}")
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn malformed_line_fails_or_is_skipped() {
    let d = tempfile::tempdir().unwrap();
    let text = "{\"a\": \"1\"}\n{\"a\": oops}\n[1, 2]\n{\"a\": \"4\"}\n";
    let p = write(d.path(), "bad.jsonl", text.as_bytes());
    let err = read_source(&p, &ReadOptions::default()).unwrap_err();
    match &err {
        ReadError::Malformed { location, span, .. } => {
            assert!(location.ends_with("bad.jsonl:2"), "{location}");
            assert_eq!(span.offset(), 6);
        }
        e => panic!("unexpected {e:?}"),
    }
    // The rendered snippet is numbered as in the file, not as line 1 of the snippet.
    let mut rendered = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut rendered, &err)
        .unwrap();
    assert!(rendered.contains("bad.jsonl:2:7"), "{rendered}");
    let opts = ReadOptions {
        on_error: ErrorPolicy::Skip,
        ..Default::default()
    };
    let (recs, stats) = read_source(&p, &opts).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(stats.skipped, 2);
    assert!(stats.skipped_examples[1].contains("bad.jsonl:3"));
    assert!(stats.skipped_examples[1].contains("expected a JSON object, found an array"));
    assert_eq!(recs[1].provenance.line, Some(4));
}

#[test]
fn json_array_syntax_error_is_fatal_with_position() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "bad.json",
        b"[\n {\"a\": \"1\"},\n {\"a\" \"2\"}\n]",
    );
    let opts = ReadOptions {
        on_error: ErrorPolicy::Skip,
        ..Default::default()
    };
    match read_source(&p, &opts).unwrap_err() {
        ReadError::Json { location, .. } => {
            assert!(location.ends_with("bad.json:3:7"), "{location}")
        }
        e => panic!("unexpected {e:?}"),
    }
    // A non-object element is a record-level problem: skippable.
    let p = write(
        d.path(),
        "mixed.json",
        b"[{\"a\": \"1\"}, 5, {\"a\": \"3\"}]",
    );
    let (recs, stats) = read_source(&p, &opts).unwrap();
    assert_eq!((recs.len(), stats.skipped), (2, 1));
    assert_eq!(recs[1].provenance.row, Some(2));
}

#[test]
fn non_utf8_is_reported_with_location() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "latin1.jsonl",
        b"{\"a\": \"ok\"}\n{\"a\": \"caf\xe9\"}\n",
    );
    match read_source(&p, &ReadOptions::default()).unwrap_err() {
        ReadError::NotUtf8 {
            location,
            byte_offset,
            ..
        } => {
            assert!(location.ends_with("latin1.jsonl:2"), "{location}");
            assert_eq!(byte_offset, 10);
        }
        e => panic!("unexpected {e:?}"),
    }
    let p = write(
        d.path(),
        "latin1.json",
        b"[{\"a\": \"ok\"},\n{\"a\": \"caf\xe9\"}]",
    );
    match read_source(&p, &ReadOptions::default()).unwrap_err() {
        ReadError::NotUtf8 { location, .. } => {
            assert!(location.ends_with("latin1.json:2"), "{location}")
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn empty_inputs_are_errors() {
    let d = tempfile::tempdir().unwrap();
    for (name, bytes) in [("e.jsonl", &b"\n\n"[..]), ("e.json", b"[]")] {
        let p = write(d.path(), name, bytes);
        assert!(matches!(
            read_source(&p, &ReadOptions::default()).unwrap_err(),
            ReadError::Empty { .. }
        ));
    }
    let missing = d.path().join("nope.jsonl");
    assert!(matches!(
        read_source(&missing, &ReadOptions::default()).unwrap_err(),
        ReadError::Io { .. }
    ));
}

#[test]
fn directory_of_source_files() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("src");
    write(&root, "b.py", b"print('b')\n");
    write(&root, "a/x.py", b"x = 1\n");
    write(&root, "a/notes.txt", b"notes");
    write(&root, "a/deep/y.py", b"y = 2\n");
    let opts = ReadOptions {
        include: vec!["**/*.py".into()],
        ..Default::default()
    };
    let (recs, stats) = read_source(&root, &opts).unwrap();
    assert_eq!(stats.format, Some(Format::Dir));
    let paths: Vec<_> = recs.iter().map(|r| r.get("path").unwrap()).collect();
    assert_eq!(paths, ["a/deep/y.py", "a/x.py", "b.py"]);
    assert_eq!(recs[1].get("content"), Some("x = 1\n"));

    let opts = ReadOptions {
        extensions: vec![".txt".into()],
        fields: mapping(&[("text", "content")]),
        ..Default::default()
    };
    let (recs, _) = read_source(&root, &opts).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].fields.iter().collect::<Vec<_>>(),
        [("text", "notes")]
    );

    let opts = ReadOptions {
        include: vec!["*.rs".into()],
        ..Default::default()
    };
    match read_source(&root, &opts).unwrap_err() {
        ReadError::Empty { hint, .. } => assert!(hint.contains("include")),
        e => panic!("unexpected {e:?}"),
    }

    write(&root, "z/bad.py", b"ok\n\xff\xfe\n");
    match read_source(&root, &ReadOptions::default()).unwrap_err() {
        ReadError::NotUtf8 { location, .. } => {
            assert!(location.ends_with("bad.py:2"), "{location}")
        }
        e => panic!("unexpected {e:?}"),
    }
    let opts = ReadOptions {
        on_error: ErrorPolicy::Skip,
        ..Default::default()
    };
    let (recs, stats) = read_source(&root, &opts).unwrap();
    assert_eq!((recs.len(), stats.skipped, stats.files), (4, 1, 5));
}

fn write_parquet(path: &Path, compression: parquet::basic::Compression) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(
            "message s { REQUIRED BYTE_ARRAY content (UTF8); REQUIRED INT64 id; OPTIONAL BYTE_ARRAY note (UTF8); }",
        )
        .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        match i {
            0 => {
                let v: Vec<ByteArray> = ["def f():\n    pass\n", "ünï", "x"]
                    .iter()
                    .map(|s| ByteArray::from(*s))
                    .collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&v, None, None)
                    .unwrap();
            }
            1 => {
                col.typed::<Int64Type>()
                    .write_batch(&[7, 8, 9], None, None)
                    .unwrap();
            }
            _ => {
                let v = vec![ByteArray::from("n0"), ByteArray::from("n2")];
                col.typed::<ByteArrayType>()
                    .write_batch(&v, Some(&[1, 0, 1]), None)
                    .unwrap();
            }
        }
        col.close().unwrap();
        i += 1;
    }
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_plain_and_snappy() {
    let d = tempfile::tempdir().unwrap();
    for (name, c) in [
        ("plain.parquet", parquet::basic::Compression::UNCOMPRESSED),
        ("snappy.parquet", parquet::basic::Compression::SNAPPY),
    ] {
        let p = d.path().join(name);
        write_parquet(&p, c);
        let (recs, stats) = read_source(&p, &ReadOptions::default()).unwrap();
        assert_eq!(stats.format, Some(Format::Parquet));
        assert_eq!(recs.len(), 3);
        assert_eq!(
            recs[0].fields.names().collect::<Vec<_>>(),
            ["content", "id", "note"]
        );
        assert_eq!(recs[0].get("content"), Some("def f():\n    pass\n"));
        assert_eq!(recs[1].get("content"), Some("ünï"));
        assert_eq!(recs[2].get("id"), Some("9"));
        assert_eq!(recs[1].get("note"), Some(""));
        assert_eq!(recs[2].get("note"), Some("n2"));
        assert_eq!(recs[2].provenance.row, Some(2));
        let opts = ReadOptions {
            fields: mapping(&[("text", "content")]),
            limit: Some(2),
            ..Default::default()
        };
        let (recs, _) = read_source(&p, &opts).unwrap();
        assert_eq!(recs.len(), 2);
    }
    let bad = write(d.path(), "bad.parquet", b"PAR1 this is not parquet");
    assert!(matches!(
        read_source(&bad, &ReadOptions::default()).unwrap_err(),
        ReadError::Parquet { .. }
    ));
}

/// The shared data directory, or `None` (with a printed reason) when it is absent.
fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("PIPELINE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: shared data not found at {} (set PIPELINE_SHARED_DATA)",
            dir.display()
        );
        None
    }
}

#[test]
fn shared_data_in_place() {
    let Some(data) = shared_data() else { return };
    let (alpaca, _) = read_source(
        &data.join("codealpaca/code_alpaca_first1000.json"),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(alpaca.len(), 1000);
    assert_eq!(
        alpaca[0].fields.names().collect::<Vec<_>>(),
        ["instruction", "input", "output"]
    );
    assert_eq!(
        alpaca.iter().filter(|r| r.get("input") == Some("")).count(),
        472
    );

    let opts = ReadOptions {
        fields: mapping(&[("text", "content")]),
        ..Default::default()
    };
    let (messy, _) = read_source(&data.join("messy/python_files_5000.jsonl"), &opts).unwrap();
    assert_eq!(messy.len(), 5000);
    assert_eq!(messy[4999].provenance.line, Some(5000));

    let opts = ReadOptions {
        fields: mapping(&[
            ("task_id", "task_id"),
            ("prompt", "prompt"),
            ("test", "test"),
        ]),
        ..Default::default()
    };
    let (he, stats) = read_source(&data.join("humaneval/HumanEval.jsonl.gz"), &opts).unwrap();
    assert_eq!((he.len(), stats.format), (164, Some(Format::Jsonl)));
    assert_eq!(he[163].get("task_id"), Some("HumanEval/163"));

    let (mbpp, _) = read_source(&data.join("mbpp/mbpp.jsonl"), &ReadOptions::default()).unwrap();
    assert_eq!(mbpp.len(), 974);
    assert!(mbpp[0].get("test_list").unwrap().starts_with("[\"assert"));
    let (san, stats) = read_source(
        &data.join("mbpp/sanitized-mbpp.json"),
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!((san.len(), stats.format), (427, Some(Format::Json)));
}

#[test]
fn options_parse_as_manifest_parameters() {
    let o: ReadOptions = serde_json::from_str(r#"{"fields": {"text": "content", "id": "path"}, "limit": 5, "on_error": "skip", "format": "jsonl"}"#).unwrap();
    assert_eq!(
        o.fields.iter().collect::<Vec<_>>(),
        [("text", "content"), ("id", "path")]
    );
    assert_eq!(
        (o.limit, o.on_error, o.format),
        (Some(5), ErrorPolicy::Skip, Format::Jsonl)
    );
    assert_eq!(o.text_field, "content", "defaults fill the rest");
    assert!(
        serde_json::from_str::<ReadOptions>(r#"{"feilds": {}}"#).is_err(),
        "unknown keys are rejected"
    );

    use pipeline_stages::tokenize::{LossOn, TokenizeOptions};
    let t: TokenizeOptions = serde_json::from_str(r#"{"template": {"name": "code_snippet"}, "max_length": 256, "loss_on": "all", "pack": true}"#).unwrap();
    assert_eq!(
        (
            t.template.name.as_str(),
            t.max_length,
            t.loss_on,
            t.pack,
            t.add_eos
        ),
        ("code_snippet", 256, LossOn::All, true, true)
    );
    assert!(serde_json::from_str::<TokenizeOptions>(r#"{"max_len": 3}"#).is_err());
}

/// The diagnostics render (spans inside their source) and point at the problem.
#[test]
fn diagnostics_render_with_snippets() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "bad.jsonl",
        "{\"a\": \"1\"}\n{\"a\": \"ü\", oops}\n".as_bytes(),
    );
    let err = read_source(&p, &ReadOptions::default()).unwrap_err();
    let mut out = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut out, &err)
        .unwrap();
    assert!(out.contains("bad.jsonl:2"), "{out}");
    assert!(out.contains("oops"), "snippet shown: {out}");
    assert!(out.contains("on_error"), "help shown: {out}");

    let p = write(d.path(), "x.jsonl", b"{\"b\": \"1\"}\n");
    let opts = ReadOptions {
        fields: mapping(&[("text", "content")]),
        ..Default::default()
    };
    let err = read_source(&p, &opts).unwrap_err();
    let mut out = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .render_report(&mut out, &err)
        .unwrap();
    assert!(out.contains("the record has these fields: [b]"), "{out}");
}

#[test]
fn utf8_byte_order_mark_is_ignored() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "bom.jsonl",
        b"\xEF\xBB\xBF{\"a\": \"1\"}\n{\"a\": \"2\"}\n",
    );
    let (recs, stats) = read_source(&p, &ReadOptions::default()).unwrap();
    assert_eq!((recs.len(), stats.format), (2, Some(Format::Jsonl)));
    let p = write(d.path(), "bom.json", b"\xEF\xBB\xBF[{\"a\": \"1\"}]");
    let (recs, stats) = read_source(&p, &ReadOptions::default()).unwrap();
    assert_eq!((recs.len(), stats.format), (1, Some(Format::Json)));
}
