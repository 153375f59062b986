from stitcher.consumer_lag import ConsumerLag


def test_behind_while_any_partition_lags_past_the_threshold() -> None:
    lag = ConsumerLag(threshold=10)
    lag.observe(0, offset=5, highwater=None)        # highwater not known yet: nothing concluded
    assert not lag.behind
    lag.observe(0, offset=5, highwater=100)          # 94 unread on partition 0
    lag.observe(1, offset=99, highwater=100)         # partition 1 caught up
    assert lag.behind and lag.total == 94
    lag.observe(0, offset=95, highwater=100)         # within the threshold now
    assert not lag.behind
    lag.observe(1, offset=10, highwater=200)
    assert lag.behind
    lag.forget({1})
    assert not lag.behind and lag.total == 4
