"""Write the small English NER data set of experiments/minilm-toy-ner.yaml (deterministic; CoNLL format).

Sentences from everyday templates with person, location and organisation names. `test-unseen` uses
names that never occur in training, so that it measures what the model learned from context.

    python experiments/data/make_toy_ner.py
"""

import random
from pathlib import Path

PEOPLE = ["John Smith", "Mary Jones", "Ahmed Khan", "Li Wei", "Maria Garcia", "Peter Brown", "Anna Novak",
          "David Miller", "Sarah Wilson", "James Taylor", "Emma Davis", "Lucas Martin", "Olga Petrova", "Yuki Tanaka"]
PLACES = ["London", "Paris", "Berlin", "Madrid", "Tokyo", "Cairo", "Toronto", "Sydney", "Chicago", "Lisbon",
          "Vienna", "Mumbai", "Nairobi", "Dublin"]
ORGS = ["Microsoft", "the United Nations", "Oxford University", "Toyota", "the World Bank", "Greenpeace",
        "Siemens", "the BBC", "Amazon", "Nestle", "the Red Cross", "Airbus"]
UNSEEN_PEOPLE = ["Carlos Mendez", "Fatima Noor", "Henrik Larsen", "Grace Okafor", "Tom Baker", "Ines Costa"]
UNSEEN_PLACES = ["Prague", "Lagos", "Seoul", "Quito", "Oslo", "Perth"]
UNSEEN_ORGS = ["Nokia", "UNICEF", "Harvard University", "Volvo", "the IMF", "Reuters"]
TEMPLATES = [
    "{PER} moved to {LOC} to work for {ORG} .",
    "{PER} visited {LOC} last summer .",
    "{ORG} opened a new office in {LOC} .",
    "Yesterday {PER} met the director of {ORG} .",
    "The train from {LOC} to {LOC} was late again .",
    "{PER} and {PER} founded {ORG} in {LOC} .",
    "According to {ORG} , prices in {LOC} rose sharply .",
    "{PER} said the talks in {LOC} went well .",
    "A spokesman for {ORG} declined to comment .",
    "{PER} grew up near {LOC} and studied at {ORG} .",
    "The weather was cold and the streets were quiet .",
    "Many people in {LOC} read the news from {ORG} every morning .",
]


def sentence(rng, people, places, orgs):
    tokens, tags = [], []
    for part in rng.choice(TEMPLATES).split():
        names = {"{PER}": ("PER", people), "{LOC}": ("LOC", places), "{ORG}": ("ORG", orgs)}.get(part)
        if names is None:
            tokens.append(part)
            tags.append("O")
            continue
        kind, pool = names
        words = rng.choice(pool).split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return tokens, tags


def write(path, sentences):
    path.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(*s)) for s in sentences) + "\n")


def main():
    rng = random.Random(13)
    out = Path(__file__).parent / "toy-ner"
    out.mkdir(exist_ok=True)
    write(out / "train.conll", [sentence(rng, PEOPLE, PLACES, ORGS) for _ in range(600)])
    write(out / "test.conll", [sentence(rng, PEOPLE, PLACES, ORGS) for _ in range(150)])
    write(out / "test-unseen.conll", [sentence(rng, UNSEEN_PEOPLE, UNSEEN_PLACES, UNSEEN_ORGS) for _ in range(150)])


if __name__ == "__main__":
    main()
