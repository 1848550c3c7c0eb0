// deploycheck: the checks .ci/run makes on what deploy/ renders. A module of
// its own so that none of this reaches the broker's go.mod.
module github.com/tokenbroker/tokenbroker/deploy/tools

go 1.26.0

require go.yaml.in/yaml/v3 v3.0.4
