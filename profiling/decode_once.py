"""A short decode of the default model for the profilers (nsys.sh, ncu.sh): warm-up, then one timed run."""

import argparse

import specdec

PROMPT = "Repeat this list exactly, then explain each item: apple, banana, cherry, date, elderberry, fig, grape."


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--num-draft-tokens", default="8")
    args = ap.parse_args()
    k = args.num_draft_tokens if args.num_draft_tokens == "auto" else int(args.num_draft_tokens)
    model = specdec.load_model()
    prompts = [PROMPT] * args.batch
    specdec.generate(model, prompts, max_new_tokens=8, drafter=args.drafter, num_draft_tokens=k)  # warm-up
    out = specdec.generate(model, prompts, max_new_tokens=args.max_new_tokens, drafter=args.drafter,
                           num_draft_tokens=k)
    print(out.stats)


if __name__ == "__main__":
    main()
