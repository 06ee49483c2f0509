"""Who sent a request: the server-set Nats-Request-Info header, and who may cancel it."""

import json

from services.scheduler.identity import REQUEST_INFO_HEADER, may_cancel, requester_of


def test_the_requester_is_the_account_and_user_the_server_names():
    info = {"acc": "CLIENT", "user": "client", "rtt": 1000}
    assert requester_of({REQUEST_INFO_HEADER: json.dumps(info)}) == "CLIENT/client"
    assert requester_of({REQUEST_INFO_HEADER: json.dumps({"acc": "CLIENT"})}) == "CLIENT"
    for headers in (None, {}, {REQUEST_INFO_HEADER: ""}, {REQUEST_INFO_HEADER: "not json"},
                    {REQUEST_INFO_HEADER: "[1]"}, {REQUEST_INFO_HEADER: json.dumps({"user": "x"})}):
        assert requester_of(headers) is None


def test_only_the_sending_tenant_cancels_and_anyone_where_there_are_no_tenants():
    assert may_cancel("CLIENT/client", "CLIENT/client")
    assert not may_cancel("CLIENT/client", "CLIENT2/client2")
    assert not may_cancel("CLIENT/client", None)  # a same-account service can not pose as nobody
    assert may_cancel(None, None) and may_cancel(None, "CLIENT/client")
