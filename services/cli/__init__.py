"""The `ringserve` command and the local stack behind `ringserve up`.

    ringserve up --workers 2 --demo-request
    ringserve generate "Hello" --max-new-tokens 16
    ringserve status
    ringserve health worker
    ringserve trace REQUEST_ID

`main`: arguments and dispatch; `commands`: generate, status, health, serve; `up`: the `up`
command around `stack` (the servers and services as child processes); `traces`: a request's
spans from Jaeger as a timeline; `terminal`: what the commands print, and their exit statuses.
"""
