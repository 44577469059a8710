"""Make the topic-classification set from chatterbot-corpus's English YAML files (how train.jsonl / eval.jsonl were made).

Usage: pip download --no-deps chatterbot-corpus==1.3.3, unzip the wheel, then
    python data/chatterbot_topics/convert.py path/to/chatterbot_corpus/data/english data/chatterbot_topics

Every line of every conversation of the eight topic files below is an utterance labelled with its file's name.
After stripping whitespace, an utterance is kept once, and dropped if it occurs in two topics (e.g. "Yes."). Per
topic the utterances are ordered by the SHA-1 of their text, at most CAP are kept, and every fifth (positions
0, 5, 10, ...) goes to eval.jsonl, the rest to train.jsonl: deterministic, stratified, no text in both.
"""

import glob
import hashlib
import json
import os
import sys

import yaml

TOPICS = ["ai", "coding", "emotion", "literature", "money", "movies", "science", "sports"]
CAP = 80

source, out = sys.argv[1], sys.argv[2]
topics_of = {}
for path in sorted(glob.glob(os.path.join(source, "*.yml"))):
    topic = os.path.splitext(os.path.basename(path))[0]
    for conversation in yaml.safe_load(open(path, encoding="utf-8"))["conversations"]:
        for line in conversation:
            text = str(line).strip()
            if text:
                topics_of.setdefault(text, set()).add(topic)
train, held_out = [], []
for topic in TOPICS:
    texts = sorted((t for t, s in topics_of.items() if s == {topic}), key=lambda t: hashlib.sha1(t.encode()).hexdigest())[:CAP]
    for i, text in enumerate(texts):
        (held_out if i % 5 == 0 else train).append({"text": text, "label": topic})
for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
    with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(name, len(rows))
