"""`mlm-lightning evaluate`: figures above chance on a separable task, the same for the same seed, every refusal in
one line, the JSON report and its safe-output rule."""

import csv
import json
import random

import pytest

from tests.support.cli import error_line, fit_args, run_cli
from tests.support.models import tiny_model
from tests.support.text import sentences


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model(tmp_path_factory.mktemp("evaluate"))


def write_csv(path, rows, header=("text", "label")) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def cat_or_dog(n: int, seed: int) -> list[tuple[str, str]]:
    """Sentences whose class is the word in them: "the cat ..." vs "the dog ..." (separable by one token)."""
    return [(s, "cat" if "cat" in s else "dog") for s in sentences(n, seed) if "cat" in s or "dog" in s]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("task")
    return {"train": write_csv(d / "train.csv", cat_or_dog(600, 1)),
            "test": write_csv(d / "test.csv", cat_or_dog(300, 2))}


def evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli("evaluate", *args)
    out = capsys.readouterr()
    return code, out.out, out.err


def report(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


FAST = ["--lr", "5e-3", "--epochs", "3", "--batch_size", "16", "--accelerator", "cpu"]


@pytest.mark.parametrize("mode", ["finetune", "probe"])
def test_a_separable_task_is_learned(capsys, tmp_path, model_dir, task, mode):
    out_json = tmp_path / "report.json"
    code, out, err = evaluate(capsys, model_dir, "--train_file", task["train"], "--test_file", task["test"], "--mode",
                              mode, "--seeds", "1", "--seed", "7", *FAST, "--output_json", str(out_json))
    assert code == 0, err
    test = report(out_json)["models"][0]["test"]
    assert test["accuracy"]["mean"] > 0.9 and test["f1_macro"]["mean"] > 0.9, (out, err)
    assert f"{test['accuracy']['mean']:.3f} ± 0.000" in out  # the table on stdout
    assert "evaluate 1/1" in err and "ETA" in err  # one progress line per run


@pytest.mark.parametrize("mode", ["finetune", "probe"])
def test_the_same_seed_gives_the_same_figures_and_another_seed_others(capsys, tmp_path, model_dir, mode):
    """On a task with a third of its labels flipped (figures below 1): seeds 7 and 8, then seed 7 alone. Fine-tuned,
    another seed gives other figures (so equal ones are no accident); the probe finds the one word that tells the
    class in any encoder, `random`'s too, and scores the same whatever the seed."""
    rng = random.Random(0)
    noisy = [(t, y if rng.random() > 0.33 else ("dog" if y == "cat" else "cat")) for t, y in cat_or_dog(600, 3)]
    train = write_csv(tmp_path / "noisy.csv", noisy)
    models = [model_dir] if mode == "finetune" else [model_dir, "random"]
    runs = []
    for seeds in ("2", "1"):
        out_json = tmp_path / f"{seeds}.json"
        code, _, err = evaluate(capsys, *models, "--train_file", train, "--split", "0.7,0.3", "--mode", mode,
                                "--seeds", seeds, "--seed", "7", *FAST, "--output_json", str(out_json))
        assert code == 0, err
        runs.append([{k: v for k, v in r.items() if k != "seconds"} for r in report(out_json)["models"][-1]["runs"]])
    (seed7, seed8), (again,) = runs
    assert again == seed7 and seed7["seed"] == 7
    assert seed8["seed"] == 8 and (seed8["test"] != seed7["test"]) == (mode == "finetune")


# -- a trained encoder beats `random` where it must: class words the task never showed in training --------------
ANIMALS = ["horse", "sheep", "goat", "cow", "pig", "duck", "goose", "donkey", "rabbit", "mule", "llama", "ox"]
PEOPLE = ["baker", "lawyer", "nurse", "teacher", "pilot", "author", "farmer", "judge", "tailor", "clerk", "doctor",
          "banker"]
ANIMAL_CONTEXTS = ["the {} eats grass in the field .", "a {} sleeps in the barn at night .",
                   "the {} drinks water from the trough .", "we fed the {} some hay ."]
PERSON_CONTEXTS = ["the {} reads a book at the desk .", "a {} writes letters in the office .",
                   "the {} talks on the phone all day .", "we asked the {} a question ."]


@pytest.mark.slow
def test_a_trained_encoder_beats_random_on_words_the_task_never_trained_on(capsys, tmp_path):
    """The probe's test rows name animals and people that its training rows never name. Nothing in a row but that
    word tells the class, and a random encoder's vector for an unseen word is unrelated to the classes: it guesses.
    An encoder pre-trained on text where each word keeps its class's company (animals eat grass, people write
    letters) has placed the unseen words beside the seen ones of their class."""
    lines = [c.format(w) for words, contexts in ((ANIMALS, ANIMAL_CONTEXTS), (PEOPLE, PERSON_CONTEXTS))
             for w in words for c in contexts] * 20
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    root = tmp_path / "run"
    assert run_cli(*fit_args(str(corpus), root, "--trainer.max_steps", "400", "--model.dropout", "0.0",
                             "--data.batch_size", "16", "--model.learning_rate", "1e-2")) == 0

    def rows(animals, people):
        return [(f"the {w}", "animal") for w in animals] + [(f"the {w}", "person") for w in people]
    train = write_csv(tmp_path / "train.csv", rows(ANIMALS[:6], PEOPLE[:6]) * 4)
    test = write_csv(tmp_path / "test.csv", rows(ANIMALS[6:], PEOPLE[6:]))
    out_json = tmp_path / "report.json"
    code, out, err = evaluate(capsys, str(root / "checkpoints" / "last.ckpt"), "random", "--mode", "probe",
                              "--train_file", train, "--test_file", test, "--seeds", "3", "--output_json",
                              str(out_json))
    assert code == 0, err
    trained, untrained = (m["test"]["accuracy"]["mean"] for m in report(out_json)["models"])
    assert trained >= 0.7 and trained >= untrained + 0.15, out


# -- refusals: one line, exit 2, before any run ------------------------------------------------------------------
def unsupported_family(tmp_path) -> str:
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    return str(d)


REFUSALS = {
    "no label column": (lambda p, m: write_csv(p / "a.csv", [("a cat", "x")] * 4, ("text", "class")), [],
                        "has no 'label' column"),
    "an empty label column": (lambda p, m: write_csv(p / "a.csv", [("a cat", "")] * 4), [], "the label ('label') is"
                              " empty"),
    "one class": (lambda p, m: write_csv(p / "a.csv", [("a cat", "x")] * 20), [], "one class only ('x')"),
    "no text column": (lambda p, m: write_csv(p / "a.csv", [("a cat", "x")] * 4, ("words", "label")), [],
                       "has no 'text' column"),
    "an unreadable file": (lambda p, m: str(p / "a.parquet"), [], "is not a readable Parquet file"),
    "a file that is not UTF-8": (lambda p, m: str(p / "b.csv"), [], "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_data_is_refused_in_one_line(capsys, tmp_path, model_dir, case):
    (tmp_path / "a.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "b.csv").write_bytes("text,label\ncaf\xe9 au lait,x\n".encode("latin-1"))
    make, extra, expected = REFUSALS[case]
    out_json = tmp_path / "report.json"
    code, out, err = evaluate(capsys, model_dir, "--train_file", make(tmp_path, model_dir), *extra, "--output_json",
                              str(out_json))
    assert code == 2 and expected in error_line(err), err
    assert not out_json.exists() and "evaluate 1/" not in err


def test_test_labels_never_seen_in_training_are_refused(capsys, tmp_path, model_dir, task):
    test = write_csv(tmp_path / "test.csv", [("the cat sees a tree .", "cat"), ("the bird sings .", "bird")])
    code, _, err = evaluate(capsys, model_dir, "--train_file", task["train"], "--test_file", test)
    assert code == 2 and "test labels never seen in training: ['bird']" in error_line(err)


def test_a_model_family_not_supported_and_random_alone_are_refused(capsys, tmp_path, task):
    code, _, err = evaluate(capsys, unsupported_family(tmp_path), "--train_file", task["train"])
    assert code == 2 and "'gpt2'" in error_line(err) and "masked-LM encoders" in error_line(err)
    code, _, err = evaluate(capsys, "random", "--train_file", task["train"])
    assert code == 2 and "random needs a trained model beside it" in error_line(err)


# -- the JSON report and its safe-output rule --------------------------------------------------------------------
def test_the_json_report_holds_each_run_and_their_mean_and_std(capsys, tmp_path, model_dir, task):
    out_json = tmp_path / "report.json"
    code, out, err = evaluate(capsys, model_dir, "random", "--train_file", task["train"], "--split", "0.7,0.3",
                              "--mode", "probe", "--seeds", "2", "--output_json", str(out_json))
    assert code == 0, err
    r = report(out_json)
    assert r["report"] == "mlm-lightning evaluate" and r["settings"]["mode"] == "probe"
    assert r["settings"]["seeds"] == [0, 1] and r["data"]["labels"] == ["cat", "dog"]
    counts = r["data"]["counts"]
    assert sum(counts["train"].values()) + sum(counts["test"].values()) == len(cat_or_dog(600, 1))
    assert [m["kind"] for m in r["models"]] == ["pretrained", "random"]
    for m in r["models"]:
        assert [run["seed"] for run in m["runs"]] == [0, 1]
        for metric in ("accuracy", "f1_macro"):
            values = [run["test"][metric] for run in m["runs"]]
            assert m["test"][metric]["mean"] == pytest.approx(sum(values) / 2)
            assert m["test"][metric]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "random (bert, untrained)" in out


def test_the_json_report_replaces_only_an_earlier_report(capsys, tmp_path, model_dir, task):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "numbers"}')
    args = [model_dir, "--train_file", task["train"], "--mode", "probe", "--seeds", "1"]
    code, _, err = evaluate(capsys, *args, "--output_json", str(mine))
    assert code == 2 and "is not a report evaluate wrote" in error_line(err) and "evaluate 1/" not in err
    assert mine.read_text() == '{"my": "numbers"}'
    ours = tmp_path / "ours.json"
    for _ in range(2):  # the second run replaces the first one's report
        code, _, err = evaluate(capsys, *args, "--output_json", str(ours))
        assert code == 0, err
    assert report(ours)["report"] == "mlm-lightning evaluate"


def test_the_spread_is_the_sample_standard_deviation_over_the_seeds():
    from mlm_lightning.evaluate.report import mean_std

    assert mean_std([0.5, 0.7]) == pytest.approx({"mean": 0.6, "std": 0.2 / 2 ** 0.5})
    assert mean_std([0.9]) == {"mean": 0.9, "std": 0.0}
