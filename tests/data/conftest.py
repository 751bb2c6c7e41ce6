"""Data-test fixtures: a small bilingual tokenizer trained once per session."""

import random

import pytest


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    from megatron_m2.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    en = ["a photo of a cat", "a red car on the road", "two dogs playing", "a bowl of noodles",
          "the city at night", "an emoji of a smiling face", "mountains and a lake"]
    zh = ["一只猫的照片", "路上的一辆红色汽车", "两只狗在玩耍", "一碗面条", "夜晚的城市",
          "一个笑脸的表情符号", "山和湖"]
    lines = [rng.choice(en) + " " + rng.choice(zh) for _ in range(400)] + en + zh
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer(lines, str(d / "tok"), vocab_size=400)
