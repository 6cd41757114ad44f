# The container path must be proven on this project's machines: fail rather than skip.
CHAT_REQUIRE_DOCKER=1 bash docker/ci.sh
