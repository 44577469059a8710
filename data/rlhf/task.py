"""The RLHF demo task and its true reward, computable by code: reply in lowercase and end with '!'.

    true_reward(y) = 0.6 * [y has no uppercase letter] + 0.4 * [y, stripped, ends with "!"]
                     (0 for a reply without any letter, so an empty reply earns nothing)

so the four styles of the same reply are strictly ordered: ``lower!`` (1.0) >
``lower.`` (0.6) > ``Sentence!`` (0.4) > ``Sentence.`` (0.0). The preference
data is derived from this function, so the effect of each pipeline stage can be
measured with it on held-out prompts, without trusting the learned reward.

Run ``python data/rlhf/task.py`` to regenerate the data files (deterministic).
All text is generated here from the word lists below (written for peftkit,
same licence as peftkit).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# The reward itself ships with peftkit (the built-in ``rewards`` plugin, reward name ``rlhf_task``): data/ is not installed.
from peftkit_plugins.rewards.rlhf_task import true_reward

__all__ = ["true_reward", "styles"]

TOPICS = [
    "cats", "dogs", "the ocean", "coffee", "tea", "rain", "snow", "the moon", "the sun", "mountains", "rivers",
    "books", "music", "bicycles", "trains", "gardens", "bread", "apples", "stars", "clouds", "birds", "forests",
    "the desert", "winter", "summer", "autumn", "spring", "chess", "painting", "cooking", "running", "swimming",
    "libraries", "bridges", "islands", "volcanoes", "whales", "bees", "owls", "tigers", "pizza", "soup",
    "the city", "villages", "lighthouses", "kites", "boats", "rockets", "robots", "computers", "poetry", "jazz",
    "football", "tennis", "the wind", "thunder", "rainbows", "honey", "cheese", "mushrooms",
]
PROMPTS = [
    "Tell me something about {t}.", "What do you think of {t}?", "Say one nice thing about {t}.",
    "Give me a short fact about {t}.", "Describe {t} in one sentence.", "Why do people like {t}?",
    "Write a short line about {t}.", "What comes to mind when you hear about {t}?",
]
REPLIES = [
    "I think {t} are lovely and full of surprises", "Many people enjoy {t} because they bring joy",
    "There is always something new to learn about {t}", "{T} can make an ordinary day feel special",
    "I like {t} a lot, they are calm and bright", "People have written about {t} for centuries",
    "A quiet moment with {t} is a good moment", "{T} remind me that the world is big and kind",
]


def styles(reply: str) -> dict[str, str]:
    """The four styles of one reply, best first."""
    sentence = reply[0].upper() + reply[1:]
    lower = reply.lower()
    return {"lower!": lower + "!", "lower.": lower + ".", "Sentence!": sentence + "!", "Sentence.": sentence + "."}


def _reply(rng: random.Random, topic: str) -> str:
    return rng.choice(REPLIES).format(t=topic, T=topic[0].upper() + topic[1:])


def main() -> None:
    rng = random.Random(0)
    pairs = [(p.format(t=t), t) for t in TOPICS for p in PROMPTS]
    rng.shuffle(pairs)
    held_out, train = pairs[:64], pairs[64:]
    here = Path(__file__).parent

    def write(name: str, rows: list[dict]) -> None:
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # SFT demonstrations: mostly plain sentence style, some already in the target style (a partial start).
    sft = []
    for prompt, topic in train:
        style = rng.choices(["Sentence.", "lower.", "Sentence!", "lower!"], weights=[0.55, 0.15, 0.15, 0.15])[0]
        sft.append({"prompt": prompt, "response": styles(_reply(rng, topic))[style]})
    write("sft.jsonl", sft)
    # Rankings of K = 4 (every style of one reply) and pairs of two different replies' styles; plus pairs
    # against a reply without letters (empty or "!"), which a learned reward would otherwise never see
    # and a policy could exploit (measured: PPO on the tiny model learned to answer with nothing).
    prefs = []
    for prompt, topic in train:
        if rng.random() < 0.25:
            good = styles(_reply(rng, topic))[rng.choice(["lower!", "lower.", "Sentence!"])]
            prefs.append({"prompt": prompt, "chosen": good, "rejected": rng.choice(["", "!", "."])})
        if rng.random() < 0.5:
            prefs.append({"prompt": prompt, "responses": list(styles(_reply(rng, topic)).values())})
        else:
            a, b = rng.sample(list(styles(_reply(rng, topic)).items()), 2), None
            (sa, ya), (sb, yb) = a
            chosen, rejected = (ya, yb) if true_reward(ya) > true_reward(yb) else (yb, ya)
            prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    write("preferences.jsonl", prefs)
    held = []
    for prompt, topic in held_out:
        held.append({"prompt": prompt, "responses": list(styles(_reply(rng, topic)).values())})
    write("preferences_eval.jsonl", held)
    write("prompts.jsonl", [{"prompt": p} for p, _ in train])
    write("prompts_eval.jsonl", [{"prompt": p} for p, _ in held_out])


if __name__ == "__main__":
    main()
