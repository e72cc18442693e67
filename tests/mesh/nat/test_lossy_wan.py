"""The runtime over a lossy, delayed WAN (netlab): bench/lossy_wan.py at a smaller size.

With 50 ms round trips between sites and 2% loss each way, a driver behind natA runs tasks, an
ordered actor and a 20 MB push and pull on a worker behind natB (cone) and one behind natC
(symmetric): every operation completes and no node declares another gone. Each node runs in its
own lab namespace (``ip netns exec``); the lab and every process are torn down by the test.

Every node runs the default QUIC backend (qh3 where installed). Its core's CUBIC reads every
loss as congestion (~0.3 MB/s at 2 % loss without help); a qh3 connection whose path loses
packets at random sends each 1-RTT datagram twice (``QuicConfig.loss_redundancy``,
latticaray/mesh/transport/quic_redundancy.py), and a host it marked lossy gets aioquic
connections from then on (``QuicConfig.lossy_*``). ``LATTICARAY_QUIC_BACKEND`` is unset for
every node: backend "auto", the default.
"""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from lossy_wan import WORKERS, run_setting  # noqa: E402

pytestmark = pytest.mark.netlab


@pytest.fixture(scope="module")
def lab_prefix():
    from netlab_util import netlab_available

    reason = netlab_available()
    if reason is not None:
        pytest.skip(reason)
    return os.environ.get("LATTICARAY_NAT_LAB_PREFIX", f"lrl{os.getpid() % 100000}") + "w"


def test_everything_completes_over_a_wan_with_2_percent_loss(lab_prefix, monkeypatch):
    monkeypatch.delenv("LATTICARAY_QUIC_BACKEND", raising=False)  # every node inherits it
    report = run_setting(
        lab_prefix, delay_ms=25, loss_pct=2.0, tasks=200, calls=50, size_mb=20, timeout=300
    )
    assert not report.get("failed"), report.get("stderr")
    for host, (tag, _nat) in WORKERS.items():
        row = report["rows"][tag]
        assert not row.get("errors"), (host, row["errors"], report["driver_log_tail"])
        assert row["tasks"] == 200 and row["actor"] == 50, row
        assert row["push"] == row["pull"] == 20 * 1024 * 1024, row
        assert row["alive_at_end"], row
    assert report["peers_lost"] == 0, report["liveness"]
    assert not any(report["lost_lines"].values()), report["lost_lines"]
    print(
        "\n2% loss, 50 ms RTT: "
        + ", ".join(
            f"{host}: {report['rows'][tag]['tasks_s']:.1f} s for 200 tasks, push "
            f"{20 / report['rows'][tag]['push_s']:.1f} MB/s, pull "
            f"{20 / report['rows'][tag]['pull_s']:.1f} MB/s"
            for host, (tag, _nat) in WORKERS.items()
        )
    )
