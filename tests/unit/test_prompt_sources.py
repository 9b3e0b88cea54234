"""`data.train` reads what `saferl eval --prompts` reads (issue 15, point 4): a parquet file, a local dataset
directory (`save_to_disk`'s, or one of data files per split) and the column mapping, through `load_config` and
the driver's prompt loading (`saferl.train.load_prompt_sets`); bad rows name the file (or directory) and row."""

import json

import pytest

from saferl.cli import main
from saferl.config import ConfigError, load_config
from saferl.train import load_prompt_sets

ROWS = {"question": ["How do I bake bread?", "How do I pick a lock?", "Is this legal?"],
        "label": ["benign", "harmful", "controversial"], "type": [None, "Non-violent Illegal Acts", None]}
MAPPING = ["data.prompt_column=question", "data.kind_column=label", "data.category_column=type"]


@pytest.fixture
def held_out(tmp_path):
    """A one-row eval.prompts, so the tests never touch the toy world."""
    f = tmp_path / "heldout.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "kind": "benign"}) + "\n")
    return f


def _cfg(train, held_out, *overrides):
    return load_config(None, [f"data.train={train}", f"eval.prompts={held_out}", *overrides])


def _parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def _expected(rows):
    return [(q, k, c) for q, k, c in zip(rows["question"], rows["label"], rows["type"])]


def _seen(prompts):
    return [(p.text, p.kind, p.category) for p in prompts]


def test_data_train_parquet_with_a_column_mapping(tmp_path, held_out):
    data = _parquet(tmp_path / "train.parquet", ROWS)
    train, evaluation = load_prompt_sets(_cfg(data, held_out, *MAPPING))
    assert _seen(train) == _expected(ROWS)
    assert [p.id for p in train] == [f"{data} row {i}" for i in range(3)]
    assert _seen(evaluation) == [("hi", "benign", None)]
    # One kind for the whole set instead of a column; rows without a kind column train as `unknown`.
    constant = load_prompt_sets(_cfg(data, held_out, "data.prompt_column=question", "data.kind=harmful"))[0]
    assert [p.kind for p in constant] == ["harmful"] * 3
    bare = _parquet(tmp_path / "bare.parquet", {"question": ROWS["question"]})
    assert [p.kind for p in load_prompt_sets(_cfg(bare, held_out, "data.prompt_column=question"))[0]] == \
        ["unknown"] * 3


def test_data_train_saved_dataset_directory_with_a_column_mapping(tmp_path, held_out):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(saved))
    train = load_prompt_sets(_cfg(saved, held_out, *MAPPING))[0]
    assert _seen(train) == _expected(ROWS) and train[1].id == f"{saved} row 1"
    # A DatasetDict: data.split picks the split; with several and none given, the error lists them.
    both = tmp_path / "both"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in ROWS.items()})}
                         ).save_to_disk(str(both))
    assert _seen(load_prompt_sets(_cfg(both, held_out, *MAPPING, "data.split=test"))[0]) == _expected(ROWS)[:1]
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\]; choose one"):
        load_prompt_sets(_cfg(both, held_out, *MAPPING))


def test_data_train_directory_of_files_per_split(tmp_path, held_out):
    root = tmp_path / "hub_layout"
    (root / "data").mkdir(parents=True)
    (root / "train.jsonl").write_text(json.dumps({"question": "a", "label": "benign"}) + "\n")
    _parquet(root / "data" / "test-00000-of-00001.parquet", {"question": ["b"], "label": ["harmful"]})
    cfg = _cfg(root, held_out, "data.prompt_column=question", "data.kind_column=label", "data.split=test")
    assert _seen(load_prompt_sets(cfg)[0]) == [("b", "harmful", None)]
    with pytest.raises(ValueError, match=r"no split 'dev'; available: \['test', 'train'\]"):
        load_prompt_sets(_cfg(root, held_out, "data.prompt_column=question", "data.split=dev"))


def test_bad_rows_name_the_parquet_file_and_row(tmp_path, held_out):
    bad = _parquet(tmp_path / "bad.parquet", {**ROWS, "question": ["fine", "   ", "fine"]})
    with pytest.raises(ValueError, match=rf"^{bad} row 1: column 'question' is empty"):
        load_prompt_sets(_cfg(bad, held_out, *MAPPING))
    with pytest.raises(ValueError, match=rf"^{bad} row 0: missing column 'prompt' .*data.prompt_column"):
        load_prompt_sets(_cfg(bad, held_out))
    typo = _parquet(tmp_path / "typo.parquet", {**ROWS, "label": ["benign", "harmfull", "benign"]})
    with pytest.raises(ValueError, match=rf"^{typo} row 1: kind 'harmfull' \(column 'label'\)"):
        load_prompt_sets(_cfg(typo, held_out, *MAPPING))


def test_bad_rows_name_the_dataset_directory_and_row_through_saferl_train(tmp_path, held_out, capsys):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({**ROWS, "type": [None, 3, None]}).save_to_disk(str(saved))
    capsys.readouterr()  # the save's progress bar
    code = main(["train", f"data.train={saved}", f"eval.prompts={held_out}", f"run.dir={tmp_path / 'run'}",
                 "run.executor=local", *MAPPING])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"saferl: error: {saved} row 1: column 'type' must be a string")
    assert not (tmp_path / "run").exists()  # refused before the run directory or any model


def test_data_kind_and_unknown_mapping_keys_are_config_errors(tmp_path, held_out):
    with pytest.raises(ConfigError, match="'data.kind' must be one of"):
        _cfg(tmp_path / "x.parquet", held_out, "data.kind=unsafe")
    with pytest.raises(ConfigError, match="data.prompt_colum"):
        _cfg(tmp_path / "x.parquet", held_out, "data.prompt_colum=question")
