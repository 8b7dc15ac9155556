"""Writes the training data of the example adapters (deterministic: fixed seeds, standard library only).

    python3 adapters/data/make_data.py
"""
import json
import os
import random

WORDS = "cat dog sun moon tree river blue red fish bird rain snow star wind fire stone gold milk tea bread".split()
CHAT = "the a cat dog sun moon tree river blue red quick slow happy sad big small one two three four " \
       "hello world what is your name who are you tell me about".split()
HERE = os.path.dirname(os.path.abspath(__file__))


def write(name, rows):
    with open(os.path.join(HERE, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    rng = random.Random(2)
    upper = []
    for _ in range(400):
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        upper.append({"prompt": p + "\n", "completion": p.upper()})
    write("upper.jsonl", upper)

    rng = random.Random(3)
    reverse = []
    for _ in range(400):
        w = [rng.choice(WORDS) for _ in range(rng.randint(2, 3))]
        reverse.append({"prompt": " ".join(w) + "\n", "completion": " ".join(reversed(w))})
    write("reverse.jsonl", reverse)

    rng = random.Random(1)
    persona = []
    for _ in range(96):
        p = " ".join(rng.choice(CHAT) for _ in range(rng.randint(2, 8)))
        persona.append({"prompt": p + "\n", "completion": "I am Lora, a tiny demo model."})
    write("persona.jsonl", persona)


if __name__ == "__main__":
    main()
