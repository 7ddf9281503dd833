"""percnb.data.text: document splits, BERT masking, windows and the count baselines."""
import pytest
import torch

from percnb.data.text import (
    IGNORE,
    MASK_ID,
    ByteMasker,
    RandomWindows,
    decode,
    encode,
    fixed_windows,
    load_text_splits,
    masked_accuracy,
    masked_eval_set,
    neighbour_predict,
    unigram_predict,
)


@pytest.fixture(scope="module")
def splits():
    return load_text_splits(seed=0)


def test_encode_decode_round_trip_with_mask():
    ids = encode("naïve café")
    assert ids.dtype == torch.long and len(ids) == len("naïve café".encode())
    assert decode(ids) == "naïve café"
    ids[0] = MASK_ID
    assert decode(ids, mask_char="_") == "_aïve café"


def test_split_is_by_whole_documents_and_fixed_by_seed(splits):
    docs = splits.documents
    assert not (set(docs["train"]) & set(docs["test"])) and not (set(docs["val"]) & set(docs["test"]))
    from pydoc_data.topics import topics
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(topics)
    total = sum(splits.sizes().values())
    assert 0.08 < len(splits.test) / total < 0.25 and 0.08 < len(splits.val) / total < 0.25
    again, other = load_text_splits(seed=0), load_text_splits(seed=1)
    assert torch.equal(again.test, splits.test) and not torch.equal(other.test, splits.test)
    first_test_doc = topics[docs["test"][0]].encode()
    assert bytes(splits.test[:len(first_test_doc)].tolist()) == first_test_doc


def test_text_file_paragraphs_are_documents(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Paragraph number {i} says something." for i in range(40)))
    s = load_text_splits(path, val_fraction=0.2, test_fraction=0.2)
    assert sum(len(v) for v in s.documents.values()) == 40
    assert b"Paragraph number" in bytes(s.test.tolist())


def test_text_splits_reject_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_text_splits(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="val_fraction and test_fraction"):
        load_text_splits(val_fraction=0.6, test_fraction=0.5)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one\n\ntwo")
    with pytest.raises(ValueError, match="at least 3 documents"):
        load_text_splits(tiny)


def test_masker_follows_bert_proportions():
    windows = torch.randint(0, 256, (400, 128), generator=torch.Generator().manual_seed(0))
    inputs, targets = ByteMasker().mask(windows, torch.Generator().manual_seed(1))
    chosen = targets != IGNORE
    assert abs(chosen.float().mean().item() - 0.15) < 0.01
    assert torch.equal(targets[chosen], windows[chosen])
    assert torch.equal(inputs[~chosen], windows[~chosen])                 # unscored bytes are untouched
    masked = (inputs == MASK_ID) & chosen
    kept = (inputs == windows) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1 - 0.1 / 256) < 0.02       # kept, or replaced by itself


def test_masker_is_fixed_by_its_generator_and_spans_are_runs():
    windows = torch.randint(0, 256, (8, 64))
    a = ByteMasker().mask(windows, torch.Generator().manual_seed(3))
    b = ByteMasker().mask(windows, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    chosen = ByteMasker(rate=0.15, span=4).chosen((200, 128), torch.Generator().manual_seed(0))
    assert abs(chosen.float().mean().item() - 0.15) < 0.03
    lengths = []
    for row in chosen.tolist():
        run = 0
        for value in row + [False]:
            if value:
                run += 1
            elif run:
                lengths.append((run, False))
                run = 0
        if row[-1]:
            lengths[-1] = (lengths[-1][0], True)                      # cut short by the window's end
    assert lengths and min(n for n, at_end in lengths if not at_end) >= 4   # runs are whole spans (or merged ones)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rate=0.0), "rate must be in"), (dict(span=0), "span must be an int"),
    (dict(mask_fraction=0.9, random_fraction=0.2), "sum to at most 1")])
def test_masker_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ByteMasker(**kwargs)


def test_masker_rejects_float_windows():
    with pytest.raises(ValueError, match=r"windows must be a \(batch, seq\) tensor of byte ids"):
        ByteMasker().mask(torch.rand(2, 8))


def test_windows(splits):
    torch.manual_seed(0)
    data = RandomWindows(splits.train, 32, length=10)
    first = data[0][0]
    assert len(data) == 10 and first.shape == (32,)
    torch.manual_seed(0)
    assert torch.equal(data[0][0], first)                              # places come from the seeded generator
    fixed = fixed_windows(splits.val, 100)
    assert fixed.shape == (len(splits.val) // 100, 100) and torch.equal(fixed[1], splits.val[100:200])
    assert fixed_windows(splits.val, 100, max_windows=5).shape == (5, 100)
    x1, y1 = masked_eval_set(splits.val, 64, ByteMasker(), seed=0)
    x2, y2 = masked_eval_set(splits.val, 64, ByteMasker(), seed=0)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    with pytest.raises(ValueError, match="longer than seq_len"):
        RandomWindows(splits.train[:10], 32, length=1)


def test_neighbour_counts_on_a_toy_text():
    train = encode("abcabcabxabc")
    inputs = encode("abcab?").view(1, -1)
    inputs[0, 1] = MASK_ID
    guess = neighbour_predict(train, inputs)
    assert chr(guess[0, 1]) == "b"                   # between 'a' and 'c' the text always has 'b'
    assert chr(guess[0, 2]) == "a"                   # left neighbour is [MASK]: no pair, no bigram: unigram
    assert chr(unigram_predict(train, inputs)[0, 0]) in "abc"
    targets = torch.full_like(inputs, IGNORE)
    targets[0, 1] = ord("b")
    assert masked_accuracy(guess, targets) == 1.0
    with pytest.raises(ValueError, match="score no position"):
        masked_accuracy(guess, torch.full_like(inputs, IGNORE))
