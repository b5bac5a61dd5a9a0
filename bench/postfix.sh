#!/bin/sh
# A private Postfix instance for oauthrelay's benchmark: its own
# config_directory, queue_directory and data_directory under DIR, chroot off,
# smtpd on 127.0.0.1:PORT, relaying everything to RELAY_PORT on 127.0.0.1
# over implicit TLS (the fake Gmail) with its TLS connection cache.
# It installs nothing: without Postfix it says so and exits 3.
#
#   bench/postfix.sh check                                  # Postfix present? prints its version
#   bench/postfix.sh setup DIR SMTPD_PORT RELAY_PORT CA_FILE
#   bench/postfix.sh start DIR                              # postfix -c DIR/etc start
#   bench/postfix.sh stop DIR                               # postfix -c DIR/etc stop (abort, then kill, if needed)
#   bench/postfix.sh queue DIR                              # messages in its queue (a number)
#   bench/postfix.sh master-pid DIR
#
# Settings that matter for the comparison (everything else is Postfix's
# default, fsync of the queue file before smtpd's 250 included):
#   relayhost = [127.0.0.1]:RELAY_PORT, smtp_tls_wrappermode = yes,
#   smtp_tls_security_level = encrypt, smtp_tls_connection_reuse = yes
#   (tlsproxy keeps TLS connections open between deliveries),
#   smtp_connection_cache_destinations = the relayhost, in every spelling
#   (connections are cached even when there is no backlog, as Postfix's
#   documentation suggests for a relayhost; in Postfix's favour on an idle
#   relay: without it each idle delivery opens a new TLS connection, about
#   5 ms instead of 0.6 ms),
#   default_process_limit = 100,
#   smtp_destination_concurrency_limit = 20 (the default).
set -eu

POSTFIX=${POSTFIX:-/usr/sbin/postfix}
POSTCONF=${POSTCONF:-/usr/sbin/postconf}
POSTSUPER=${POSTSUPER:-/usr/sbin/postsuper}

die() { echo "postfix.sh: $*" >&2; exit 1; }

# Postfix reports to its log, not to a stderr that is not a terminal.
fail_with_log() {
    echo "postfix.sh: $2; the end of $1/maillog:" >&2
    tail -n 20 "$1/maillog" >&2 2>/dev/null || true
    exit 1
}

have_postfix() {
    if [ ! -x "$POSTFIX" ] || [ ! -x "$POSTCONF" ]; then
        echo "postfix.sh: Postfix is not installed ($POSTFIX not found); the benchmark runs oauthrelay only (apt-get install postfix to compare)" >&2
        exit 3
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "postfix.sh: a private Postfix instance must be started as root" >&2
        exit 3
    fi
    id postfix >/dev/null 2>&1 || { echo "postfix.sh: no 'postfix' user" >&2; exit 3; }
}

cmd=${1:-}
[ -n "$cmd" ] || die "usage: $0 check|setup|start|stop|queue|master-pid ..."
shift

case "$cmd" in
check)
    have_postfix
    "$POSTCONF" -d -h mail_version
    ;;

setup)
    have_postfix
    [ $# -eq 4 ] || die "usage: $0 setup DIR SMTPD_PORT RELAY_PORT CA_FILE"
    dir=$1 port=$2 relay=$3 ca=$4
    daemon_dir=$("$POSTCONF" -d -h daemon_directory)
    mkdir -p "$dir/etc" "$dir/queue" "$dir/data"
    # Postfix insists on root-owned, not group/other-writable directories.
    chown root:root "$dir" "$dir/etc" "$dir/queue"
    chmod 755 "$dir" "$dir/etc" "$dir/queue"
    chown postfix "$dir/data"
    cp "$ca" "$dir/etc/ca.pem"
    chmod 644 "$dir/etc/ca.pem"
    cat >"$dir/etc/main.cf" <<EOF
compatibility_level = 3.6
config_directory = $dir/etc
queue_directory = $dir/queue
data_directory = $dir/data
daemon_directory = $daemon_dir
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
relay_domains =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:$relay
smtp_tls_security_level = encrypt
smtp_tls_wrappermode = yes
smtp_tls_CAfile = $dir/etc/ca.pem
smtp_tls_connection_reuse = yes
smtp_connection_cache_destinations = [127.0.0.1]:$relay, [127.0.0.1], 127.0.0.1
smtp_tls_session_cache_database = btree:\$data_directory/smtp_scache
smtp_tls_loglevel = 0
default_process_limit = 100
smtp_destination_concurrency_limit = 20
biff = no
append_dot_mydomain = no
smtputf8_enable = no
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
alternate_config_directories = $dir/etc
EOF
    # chroot (column 5) is "n" everywhere.
    cat >"$dir/etc/master.cf" <<EOF
127.0.0.1:$port inet n - n - - smtpd
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
tlsproxy   unix  - - n -    0 tlsproxy
EOF
    "$POSTFIX" -c "$dir/etc" check || fail_with_log "$dir" "postfix check failed"
    ;;

start)
    have_postfix
    [ $# -eq 1 ] || die "usage: $0 start DIR"
    "$POSTFIX" -c "$1/etc" start || fail_with_log "$1" "postfix start failed"
    ;;

stop)
    [ $# -eq 1 ] || die "usage: $0 stop DIR"
    dir=$1
    pidfile="$dir/queue/pid/master.pid"
    [ -f "$pidfile" ] || exit 0
    pid=$(tr -d ' \n' <"$pidfile")
    kill -0 "$pid" 2>/dev/null || exit 0
    "$POSTFIX" -c "$dir/etc" stop >/dev/null 2>&1 || "$POSTFIX" -c "$dir/etc" abort >/dev/null 2>&1 || true
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
    fi
    ;;

queue)
    [ $# -eq 1 ] || die "usage: $0 queue DIR"
    find "$1/queue/incoming" "$1/queue/active" "$1/queue/deferred" "$1/queue/maildrop" -type f 2>/dev/null | wc -l
    ;;

master-pid)
    [ $# -eq 1 ] || die "usage: $0 master-pid DIR"
    tr -d ' \n' <"$1/queue/pid/master.pid"
    echo
    ;;

*)
    die "unknown command $cmd"
    ;;
esac
