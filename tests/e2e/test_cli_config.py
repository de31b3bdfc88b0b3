"""CLI resolution: EngineArgs defaults < --config YAML < flags; no model is loaded."""
from __future__ import annotations

import dataclasses

import pytest

from engine.config import EngineArgs
from server.__main__ import build_parser, load_config_file, parse_size, resolve
from tests.e2e.helpers import REPO


def test_defaults_match_engine_args():
    engine_args, opts = resolve([], environ={})
    assert engine_args == EngineArgs()
    assert (opts.host, opts.port, opts.api_key, opts.cors_origins) == ("127.0.0.1", 8000, None, ())


def test_every_engine_field_is_a_flag():
    flags = {a.dest for a in build_parser()._actions}
    assert set(EngineArgs.field_names()) <= flags


def test_yaml_then_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-num-seqs: 4\nkv_cache_memory: 256MiB\nport: 9001\n"
                   "enable_prefix_caching: false\ncors_origins: [http://a]\n")
    engine_args, opts = resolve(["--config", str(cfg), "--max-num-seqs", "8"], environ={})
    assert engine_args.max_num_seqs == 8  # flag beats YAML
    assert engine_args.kv_cache_memory == 256 << 20  # YAML beats default
    assert engine_args.enable_prefix_caching is False
    assert opts.port == 9001 and opts.cors_origins == ("http://a",)


def test_bool_flags_and_lists():
    engine_args, opts = resolve(["--no-enable-prefix-caching", "--cors-origins",
                                 "http://a,http://b", "http://c"], environ={})
    assert engine_args.enable_prefix_caching is False
    assert opts.cors_origins == ("http://a", "http://b", "http://c")


def test_api_key_flag_beats_environment():
    _, opts = resolve([], environ={"STRIX_API_KEY": "from-env"})
    assert opts.api_key == "from-env"
    _, opts = resolve(["--api-key", "from-flag"], environ={"STRIX_API_KEY": "from-env"})
    assert opts.api_key == "from-flag"


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max_num_seq: 4\n")
    with pytest.raises(ValueError, match="unknown option"):
        load_config_file(cfg)
    with pytest.raises(SystemExit):
        resolve(["--config", str(cfg)], environ={})


def test_shipped_default_config_is_the_defaults():
    engine_args, opts = resolve(["--config", str(REPO / "configs" / "default.yaml")], environ={})
    assert dataclasses.asdict(engine_args) == dataclasses.asdict(EngineArgs())
    assert opts.port == 8000


@pytest.mark.parametrize("text,value", [("1024", 1024), ("512MiB", 512 << 20), ("2G", 2 << 30),
                                        ("1.5gb", 3 << 29), ("64k", 64 << 10)])
def test_parse_size(text, value):
    assert parse_size(text) == value
