"""Convert chatterbot-corpus's English YAML conversations into prompt/response jsonl (how english.jsonl was made).

Usage: pip download --no-deps chatterbot-corpus==1.3.3, unzip the wheel, then
    python data/chatterbot/convert.py path/to/chatterbot_corpus/data/english > data/chatterbot/english.jsonl
Every pair of consecutive lines of a conversation is a prompt/response pair
(2,393 pairs); after stripping whitespace, exact duplicate pairs are kept once (1,229 pairs), so a pair cannot be
in the training and the held-out split at once. Order: file name, then corpus order.
"""

import glob
import json
import os
import sys

import yaml

seen = set()
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.yml"))):
    category = os.path.splitext(os.path.basename(path))[0]
    for conversation in yaml.safe_load(open(path, encoding="utf-8"))["conversations"]:
        for prompt, response in zip(conversation, conversation[1:]):
            pair = (str(prompt).strip(), str(response).strip())
            if pair in seen or not all(pair):
                continue
            seen.add(pair)
            print(json.dumps({"prompt": pair[0], "response": pair[1], "category": category}, ensure_ascii=False))
