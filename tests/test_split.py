import pytest

from cecollm.errors import UserError
from cecollm.split import Split, default_exits, parse_exits


def test_upload_defaults_to_last_exit():
    split = Split.create(30, (8, 15))
    assert split.upload_layer == 15 and split.last_exit == 15
    assert Split.create(30, (8, 15), upload_layer=10).upload_layer == 10


@pytest.mark.parametrize("exits,upload,message", [
    ((), None, "at least one exit"),
    ((8, 30), None, "out of range"),
    ((0, 4), None, "out of range"),
    ((15, 8), None, "strictly increasing"),
    ((8, 8), None, "strictly increasing"),
    ((8, 15), 16, "upload layer"),
    ((8, 15), 0, "upload layer"),
])
def test_bad_splits(exits, upload, message):
    with pytest.raises(UserError, match=message):
        Split.create(30, exits, upload)


def test_parse_exits():
    assert parse_exits("8,15") == (8, 15)
    assert parse_exits(" 3 , 9 ") == (3, 9)
    for bad in ("a,b", "", ","):
        with pytest.raises(UserError):
            parse_exits(bad)


def test_default_exits():
    assert default_exits(30) == (7, 15)
    assert default_exits(8) == (2, 4)
    assert default_exits(2) == (1,)
