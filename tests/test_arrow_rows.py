"""ArrowRows reads batches of rows chunk by chunk, in the order asked, whatever the chunking."""

from __future__ import annotations

import numpy as np
from datasets import Dataset, concatenate_datasets

from spatia_hf.data.datasets import ArrowRows


def test_rows_of_a_many_chunk_dataset_come_back_in_the_order_asked():
    parts = [Dataset.from_dict({"i": list(range(k * 10, k * 10 + 10)), "v": [[float(j)] * 3 for j in range(10)]})
             for k in range(5)]
    ds = concatenate_datasets(parts)
    rows = ArrowRows(ds)
    assert rows._table.column("i").num_chunks == 5
    ask = [47, 3, 12, 3, 49, 0, 25]
    got = rows.__getitems__(ask)
    assert got["i"].tolist() == ask
    assert [v.tolist() for v in got["v"]] == [[float(a % 10)] * 3 for a in ask]
    picked = ArrowRows(ds.select([40, 2, 31]))  # an indices mapping on top of the chunks
    assert picked.__getitems__([2, 0])["i"].tolist() == [31, 40]
    assert np.asarray(picked.__getitems__([-1])["i"]).tolist() == [31]
