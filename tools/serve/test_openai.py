#!/usr/bin/env python3
"""Drives a running `demask serve` with the official `openai` Python client.

    python3 tools/serve/test_openai.py --base-url http://127.0.0.1:8000/v1 [--api-key KEY] [--model NAME]

Checks completions, chat, streaming (deltas concatenate to the non-streaming answer at
temperature 0 with the same settings; demask's own fields go through `extra_body`), the usage
chunk, n, stop strings, `models.list()`, and how errors map to the client's exceptions
(BadRequestError naming the parameter, AuthenticationError for a wrong key when the server has
one, NotFoundError for an unknown route). Prints one line per check and a summary line
`test_openai: P passed, F failed`; exits non-zero on any failure (2 when `openai` is not
installed). The server needs a checkpoint with a tokenizer (text prompts and chat), e.g.
`demask make-checkpoint --preset tiny-llada --out DIR` then `demask serve --model DIR`.
tests/serve_load.rs (`serve_openai_client`) runs it against the real binary; .ci/run makes that
mandatory (DEMASK_REQUIRE_OPENAI=1 with the venv's python in DEMASK_PYTHON).
"""
import argparse
import sys
import traceback

try:
    import httpx
    import openai
except ImportError as e:  # the caller decides whether that is a skip or a failure
    print(f"test_openai: cannot import the openai client ({e}); pip install openai", file=sys.stderr)
    sys.exit(2)

# demask's extension fields: small blocks, a fixed schedule, no EOS stop (every slot decodes).
DEMASK = {"block_len": 8, "policy": "schedule:4", "stop_at_eos": False, "cache": "dual"}


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


class Suite:
    def __init__(self, args):
        self.args = args
        self.client = openai.OpenAI(
            base_url=args.base_url, api_key=args.api_key or "unused", max_retries=0, timeout=120.0
        )
        self.model = args.model
        self.results = []

    def run(self, name, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            self.results.append((name, False))
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stdout)
        else:
            self.results.append((name, True))
            print(f"ok   {name}")

    # ---- checks ----

    def models(self):
        listed = [m.id for m in self.client.models.list()]
        check(len(listed) >= 1, "models.list() is empty")
        if self.model is None:
            self.model = listed[0]
        check(self.model in listed, f"{self.model!r} not in {listed}")

    def completion(self, **kw):
        return self.client.completions.create(model=self.model, **kw)

    def chat(self, **kw):
        return self.client.chat.completions.create(model=self.model, **kw)

    def completions(self):
        r = self.completion(prompt="Hello, world", max_tokens=16, temperature=0, extra_body=DEMASK)
        check(r.object == "text_completion", r.object)
        check(len(r.choices) == 1, r.choices)
        c = r.choices[0]
        check(isinstance(c.text, str), c)
        check(c.finish_reason in ("length", "stop"), c.finish_reason)
        check(r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage)
        d = r.model_dump()
        check(d["demask"]["gen_len"] == 16 and d["demask"]["block_len"] == 8, d["demask"])
        check(len(d["choices"][0]["demask"]["tokens"]) <= 16, d["choices"][0])
        # Deterministic at temperature 0; token-id prompts work through the client too.
        again = self.completion(prompt="Hello, world", max_tokens=16, temperature=0, extra_body=DEMASK)
        check(again.choices[0].text == c.text, (again.choices[0].text, c.text))
        ids = self.completion(prompt=[1, 2, 3, 4], max_tokens=8, temperature=0, extra_body=DEMASK)
        check(len(ids.choices) == 1 and ids.usage.prompt_tokens == 4, ids.usage)

    def chat_completions(self):
        msgs = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"},
        ]
        r = self.chat(messages=msgs, max_tokens=16, temperature=0, extra_body=DEMASK)
        check(r.object == "chat.completion", r.object)
        m = r.choices[0].message
        check(m.role == "assistant" and isinstance(m.content, str), m)
        check(r.choices[0].finish_reason in ("length", "stop"), r.choices[0].finish_reason)
        # The conversation matters: one message alone gives a different prompt.
        one = self.chat(messages=msgs[-1:], max_tokens=16, temperature=0, extra_body=DEMASK)
        check(one.usage.prompt_tokens < r.usage.prompt_tokens, (one.usage, r.usage))
        # max_completion_tokens is honoured.
        mc = self.chat(messages=msgs, max_completion_tokens=8, temperature=0, extra_body=DEMASK)
        check(mc.model_dump()["demask"]["gen_len"] == 8, mc.model_dump()["demask"])

    def streaming_completions(self):
        kw = dict(prompt="Stream this", max_tokens=32, temperature=0, extra_body=DEMASK)
        whole = self.completion(**kw)
        text, finish, n_chunks, usage = "", None, 0, None
        for ch in self.completion(stream=True, stream_options={"include_usage": True}, **kw):
            if ch.usage is not None:
                usage = ch.usage
            if not ch.choices:
                continue
            check(ch.object == "text_completion", ch.object)
            n_chunks += 1
            text += ch.choices[0].text or ""
            if ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        check(text == whole.choices[0].text, f"streamed {text!r} != whole {whole.choices[0].text!r}")
        check(finish == whole.choices[0].finish_reason, (finish, whole.choices[0].finish_reason))
        check(n_chunks >= 1, n_chunks)
        check(usage is not None, "no usage chunk with stream_options.include_usage")
        check(usage.prompt_tokens == whole.usage.prompt_tokens, (usage, whole.usage))
        if finish == "length":  # (a choice cut short by EOS/stop reports no final output while streaming)
            check(usage.completion_tokens == whole.usage.completion_tokens, (usage, whole.usage))

    def streaming_chat(self):
        kw = dict(messages=[{"role": "user", "content": "Say something."}], max_tokens=32, temperature=0, extra_body=DEMASK)
        whole = self.chat(**kw)
        text, roles, finish = "", [], None
        for ch in self.chat(stream=True, **kw):
            check(ch.object == "chat.completion.chunk", ch.object)
            if not ch.choices:
                continue
            d = ch.choices[0].delta
            roles.append(d.role)
            text += d.content or ""
            if ch.choices[0].finish_reason:
                finish = ch.choices[0].finish_reason
        check(roles and roles[0] == "assistant", f"first delta's role: {roles}")
        check(all(r is None for r in roles[1:]), f"role after the first delta: {roles}")
        want = whole.choices[0].message.content
        check(text == want, f"streamed {text!r} != whole {want!r}")
        check(finish == whole.choices[0].finish_reason, (finish, whole.choices[0].finish_reason))

    def n_and_seed(self):
        kw = dict(messages=[{"role": "user", "content": "Pick two."}], max_tokens=16, temperature=0.8, seed=5, n=2,
                  extra_body=DEMASK)
        a = self.chat(**kw)
        b = self.chat(**kw)
        check(len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1], a.choices)
        check([c.message.content for c in a.choices] == [c.message.content for c in b.choices], "same seed, same choices")
        toks = [c["demask"]["tokens"] for c in a.model_dump()["choices"]]
        check(toks[0] != toks[1], f"n=2 choices are identical: {toks}")

    def stop_strings(self):
        kw = dict(max_tokens=32, temperature=0, extra_body=DEMASK)
        for k in range(20):
            prompt = f"stop {k}"
            full = self.completion(prompt=prompt, **kw).choices[0].text
            chars = [c for c in full[len(full) // 3:] if c != "\ufffd" and not c.isspace()]
            if chars:
                break
        else:
            raise AssertionError("no prompt gave a text with a usable stop character")
        stop = chars[0]
        want = full[: full.index(stop)]
        r = self.completion(prompt=prompt, stop=[stop], **kw)
        check(r.choices[0].text == want, f"stop {stop!r}: {r.choices[0].text!r} != {want!r} (full {full!r})")
        check(r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
        text = "".join(ch.choices[0].text for ch in self.completion(prompt=prompt, stop=stop, stream=True, **kw) if ch.choices)
        check(text == want, f"streamed with stop {stop!r}: {text!r} != {want!r}")
        check(stop not in text, text)

    def bad_request(self, param, **kw):
        try:
            self.completion(**kw)
        except openai.BadRequestError as e:
            check(e.status_code == 400, e.status_code)
            body = e.body if isinstance(e.body, dict) else {}
            check(body.get("param") == param or getattr(e, "param", None) == param, f"param: {e.body}")
            check(param in str(e), f"{param!r} not in the message: {e}")
            return e
        raise AssertionError(f"{kw} was accepted")

    def errors(self):
        self.bad_request("temperature", prompt="x", max_tokens=8, temperature=-1)
        self.bad_request("top_p", prompt="x", max_tokens=8, top_p=1.5)
        self.bad_request("max_tokens", prompt="x", max_tokens=0)
        self.bad_request("n", prompt="x", max_tokens=8, n=99)
        self.bad_request("logprobs", prompt="x", max_tokens=8, logprobs=3)
        self.bad_request("prompt", prompt=[1, 2, 10**9], max_tokens=8)
        self.bad_request("max_tokens", prompt="x", max_tokens=100000)
        self.bad_request("policy", prompt="x", max_tokens=8, extra_body={"policy": "nonsense:1"})
        try:
            self.client.completions.create(model="no-such-model", prompt="x", max_tokens=8)
        except openai.BadRequestError as e:
            check(getattr(e, "code", None) == "model_not_found", f"code: {e.body}")
        else:
            raise AssertionError("an unknown model was accepted")
        try:
            self.chat(messages=[{"role": "user", "content": "x"}], max_tokens=8, temperature=-2)
        except openai.BadRequestError as e:
            check("temperature" in str(e), str(e))
        else:
            raise AssertionError("chat with temperature -2 was accepted")

    def auth(self):
        if not self.args.api_key:
            print("     (no --api-key: the authentication check is skipped)")
            return
        bad = openai.OpenAI(base_url=self.args.base_url, api_key="wrong-" + self.args.api_key, max_retries=0, timeout=30.0)
        for call in (lambda: bad.models.list(), lambda: bad.completions.create(model=self.model, prompt="x", max_tokens=8)):
            try:
                call()
            except openai.AuthenticationError as e:
                check(e.status_code == 401, e.status_code)
            else:
                raise AssertionError("a wrong API key was accepted")

    def not_found(self):
        try:
            self.client.get("/no-such-route", cast_to=httpx.Response)
        except openai.NotFoundError as e:
            check(e.status_code == 404, e.status_code)
        else:
            raise AssertionError("an unknown route answered")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=None, help="the server's --api-key (enables the authentication check)")
    ap.add_argument("--model", default=None, help="the served model name (default: the first of /v1/models)")
    args = ap.parse_args()
    s = Suite(args)
    s.run("models.list", s.models)
    if s.model is None:
        print("test_openai: 0 passed, 1 failed (no model to test)")
        return 1
    for name, fn in [
        ("completions", s.completions),
        ("chat.completions", s.chat_completions),
        ("streaming completions", s.streaming_completions),
        ("streaming chat", s.streaming_chat),
        ("n and seed", s.n_and_seed),
        ("stop strings", s.stop_strings),
        ("errors -> BadRequestError", s.errors),
        ("wrong key -> AuthenticationError", s.auth),
        ("unknown route -> NotFoundError", s.not_found),
    ]:
        s.run(name, fn)
    passed = sum(ok for _, ok in s.results)
    failed = len(s.results) - passed
    print(f"test_openai: {passed} passed, {failed} failed (openai {openai.__version__}, {args.base_url})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
