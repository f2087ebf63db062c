"""The counterfactual-context task behind the context-sensitivity knob (shared by
find_context_knob.py and eval_context_knob.py).

Each item is a city the model knows the country of, and a wrong country the context claims:
"Context: Paris is in Japan. Question: Which country is Paris in?" An answer naming Japan
follows the context; one naming France follows the model's prior knowledge. The intents are
the paper's: an instruction to use the context or to use prior knowledge; "none" asks plainly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CITIES = [
    ("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
    ("Tokyo", "Japan"), ("London", "England"), ("Moscow", "Russia"), ("Cairo", "Egypt"),
    ("Beijing", "China"), ("Lisbon", "Portugal"), ("Athens", "Greece"), ("Vienna", "Austria"),
    ("Dublin", "Ireland"), ("Ottawa", "Canada"), ("Toronto", "Canada"),
    ("Sydney", "Australia"), ("Mumbai", "India"), ("Delhi", "India"), ("Chicago", "America"),
    ("Boston", "America"), ("Munich", "Germany"), ("Milan", "Italy"), ("Barcelona", "Spain"),
    ("Osaka", "Japan"), ("Shanghai", "China"), ("Melbourne", "Australia"),
    ("Vancouver", "Canada"), ("Naples", "Italy"), ("Hamburg", "Germany"), ("Seville", "Spain"),
    ("Kyoto", "Japan"), ("Manchester", "England"), ("Liverpool", "England"),
    ("Marseille", "France"), ("Lyon", "France"), ("Venice", "Italy"), ("Florence", "Italy"),
    ("Montreal", "Canada"), ("Seattle", "America"), ("Miami", "America"),
    ("Stockholm", "Sweden"), ("Oslo", "Norway"), ("Helsinki", "Finland"),
    ("Copenhagen", "Denmark"), ("Warsaw", "Poland"), ("Prague", "Czechia"),
    ("Budapest", "Hungary"), ("Amsterdam", "Netherlands"), ("Brussels", "Belgium"),
    ("Istanbul", "Turkey"), ("Bangkok", "Thailand"), ("Seoul", "Korea"), ("Mexico City",
                                                                          "Mexico"),
    ("Buenos Aires", "Argentina"), ("Rio de Janeiro", "Brazil"), ("Lima", "Peru"),
    ("Nairobi", "Kenya"), ("Lagos", "Nigeria"), ("Havana", "Cuba"), ("Jakarta", "Indonesia"),
]
INSTRUCTIONS = {
    "context": "\nAnswer according to the context.",
    "prior": "\nIgnore the context and answer from what you know.",
    "none": "",
}


@dataclass(frozen=True)
class Item:
    city: str
    country: str  # the prior's answer
    claimed: str  # the context's answer

    def question(self, intent: str) -> str:
        return (f"Context: {self.city} is in {self.claimed}.\nQuestion: Which country is "
                f"{self.city} in?{INSTRUCTIONS[intent]}")

    def follows(self, answer: str) -> str:
        """"context", "prior" or "neither", by which country the answer names first (the city
        left out: "Mexico City" does not name Mexico)."""
        answer = answer.replace(self.city, "")
        found = {side: answer.find(country) for side, country in
                 (("context", self.claimed), ("prior", self.country))}
        named = {side: at for side, at in found.items() if at >= 0}
        return min(named, key=named.get) if named else "neither"


def split(seed: int = 0) -> dict[str, list[Item]]:
    """train (extraction), dev (layer search) and held-out (evaluation), disjoint cities; each
    claimed country is one that some other city is in."""
    rng = random.Random(seed)
    countries = sorted({country for _, country in CITIES})
    items = [Item(city, country, rng.choice([c for c in countries if c != country]))
             for city, country in CITIES]
    rng.shuffle(items)
    return {"train": items[:30], "dev": items[30:42], "held_out": items[42:]}
