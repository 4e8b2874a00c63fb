#!/usr/bin/env bash
# Makes sure RabbitMQ and Redis answer on localhost: uses them when they run,
# starts them when installed, installs them from Debian packages when we are
# root, and otherwise says exactly what to run. Idempotent.
set -euo pipefail

AMQP_PORT=${PLEURA_AMQP_PORT:-5672}
REDIS_PORT=${PLEURA_REDIS_PORT:-6379}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "error: $1 did not come up on port $2 within $3 s" >&2; return 1
}

apt_install() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "error: $1 is not installed. Install it, e.g.: sudo apt-get install -y $1" >&2
    exit 1
  fi
  echo "installing $1 from Debian packages..."
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
}

if ! port_open "$REDIS_PORT"; then
  command -v redis-server >/dev/null || apt_install redis-server
  echo "starting redis-server on port $REDIS_PORT"
  mkdir -p /tmp/pleura-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /tmp/pleura-redis --logfile /tmp/pleura-redis/redis.log
  wait_port redis "$REDIS_PORT" 30
fi

if ! port_open "$AMQP_PORT"; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  echo "starting rabbitmq-server (this takes a few seconds)"
  rabbitmq-server -detached || true
  wait_port rabbitmq "$AMQP_PORT" 90
  # The port opens before the broker accepts work; wait for it properly.
  command -v rabbitmqctl >/dev/null && timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
# The broker refuses any message bigger than a worker would read (64 MiB,
# `scan::DEFAULT_MAX_BYTES`), so a hostile publisher cannot park gigabytes on
# the queues. Production brokers set `max_message_size` in rabbitmq.conf;
# here it is set on the running node.
if command -v rabbitmqctl >/dev/null; then
  timeout 30 rabbitmqctl eval 'application:set_env(rabbit, max_message_size, 67108864).' >/dev/null 2>&1 || true
fi
echo "services: redis :$REDIS_PORT and rabbitmq :$AMQP_PORT are up"
