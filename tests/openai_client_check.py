"""Checks serve.py with OpenAI's own Python client: models, completions, chat (streamed and not).

Run it with a Python that has `openai` (a throwaway venv; it is never a dependency of this project),
against a running server:

    python serve.py --init random --preset mini --template alpaca --port 8011 &
    VENV/bin/python tests/openai_client_check.py --url http://127.0.0.1:8011/v1 --model random
"""
import argparse

from openai import BadRequestError, NotFoundError, OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default="gpt2")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0, timeout=120)

    print("models:", [m.id for m in client.models.list()])
    completion = client.completions.create(model=args.model, prompt="Every effort moves you", max_tokens=12,
                                           temperature=0)
    print("completion:", repr(completion.choices[0].text), completion.choices[0].finish_reason, completion.usage)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model=args.model, messages=messages, max_tokens=12, seed=1)
    print("chat:", repr(chat.choices[0].message.content), chat.choices[0].finish_reason, chat.usage)
    stream = client.chat.completions.create(model=args.model, messages=messages, max_tokens=12, seed=1, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    print("chat streamed:", repr("".join(pieces)), finish, usage)
    assert "".join(pieces) == chat.choices[0].message.content, "streamed and whole answers differ for one seed"
    streamed = client.completions.create(model=args.model, prompt="Every effort moves you", max_tokens=12,
                                         temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in streamed)
    print("completion streamed:", repr(text))
    assert text == completion.choices[0].text, "streamed and whole greedy completions differ"
    for bad in ({"model": "no-such-model"}, {"model": args.model, "n": 2}):
        try:
            client.completions.create(prompt="x", max_tokens=1, **bad)
        except (BadRequestError, NotFoundError) as e:
            print(f"refused as expected: {e.status_code} {e.body}")
        else:
            raise AssertionError(f"{bad} was not refused")
    print("all checks passed")


if __name__ == "__main__":
    main()
