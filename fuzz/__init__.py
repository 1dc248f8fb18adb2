"""Fuzzing: every parser of untrusted bytes, driven by atheris (`make fuzz`) and by Hypothesis.

What Ferry parses from outside, and the target that fuzzes it (`fuzz/targets/<name>.py`):

    the network          hbone (HBONE tunnel core), authority (CONNECT :authority), http1
                         (HTTP/1.1 inspector), http1_framing (heads and chunked bodies), sniff
                         (which inspector), http2 (HTTP/2 inspector), jwt (tokens in requests),
                         path (path normalization for policy), jwks (key sets from jwksUri)
    the agent socket     control (agent <-> proxy), worker_messages (supervisor <-> worker),
                         policy_set (the policy the agent pushes), admin_request (agent.sock)
    files                policy_documents (the policy folder), directory (the shared mesh
                         folder), config (agent.yaml), enrollments (the enrollment store)
    the CNI plugin       cni (the invocation ferry-cni forwards: environment and network
                         config), cni_conflist (the primary CNI's file Ferry chains into)

A target module has two functions and nothing else of note: `seeds()`, a few valid inputs
made with the project's own encoders and a few malformed ones, and `check(data)`, which runs the
parser on `data` and asserts its contract: it raises nothing but its documented error (anything
else propagates, and is a finding), its output and what it buffers stay bounded, and what
parses encodes again to the same value where an encoder exists.  A target that needs several
inputs (a client and a server, one read after another) cuts `data` at `inputs.SEP`.

Two drivers share the targets.  `python -m fuzz.targets.<name> [libFuzzer flags]` runs one under
atheris (coverage-guided; `fuzz.harness`), `make fuzz` runs them all for a bounded time each
(`fuzz.run`).  `tests/fuzz/` runs every `check` in `make test` through Hypothesis, on
structured inputs and on byte mutations of the corpus.  The corpus, `fuzz/corpus/<name>/`, is
kept in the repository: `make fuzz-corpus` writes the seeds again (`fuzz.corpus`), and an input
that once crashed a parser is added there as `regress-*` so both drivers replay it forever.
Crashes go to `fuzz/crashes/`, what libFuzzer learns during a run to `fuzz/work/` (both ignored
by git).

A new parser gets a target module here, its seeds (`make fuzz-corpus TARGET=<name>`) and a test
in `tests/fuzz/`; `make fuzz` finds it by its file.
"""
