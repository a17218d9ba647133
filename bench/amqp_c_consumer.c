/* The broker's ceiling for any AMQP consumer on this machine (bench_amqp.py builds it).
 *
 *   amqp_c_consumer HOST PORT VHOST USER PASSWORD QUEUE MESSAGES
 *
 * librabbitmq (rabbitmq-c), prefetch 2,000, acknowledges 500 deliveries at a time
 * (basic.ack multiple), reads each message body and does nothing else. Prints
 * "MESSAGES SECONDS" once MESSAGES deliveries are acknowledged, timed from basic.consume.
 */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define PREFETCH 2000
#define ACK_EVERY 500

static void die_on_reply(amqp_rpc_reply_t reply, const char *what) {
    if (reply.reply_type != AMQP_RESPONSE_NORMAL) {
        fprintf(stderr, "%s failed (reply type %d)\n", what, (int)reply.reply_type);
        exit(2);
    }
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT VHOST USER PASSWORD QUEUE MESSAGES\n", argv[0]);
        return 2;
    }
    long wanted = atol(argv[7]);
    amqp_connection_state_t conn = amqp_new_connection();
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (sock == NULL || amqp_socket_open(sock, argv[1], atoi(argv[2])) != AMQP_STATUS_OK) {
        fprintf(stderr, "cannot connect to %s:%s\n", argv[1], argv[2]);
        return 2;
    }
    die_on_reply(amqp_login(conn, argv[3], 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, argv[4],
                            argv[5]),
                 "login");
    amqp_channel_open(conn, 1);
    die_on_reply(amqp_get_rpc_reply(conn), "channel.open");
    amqp_basic_qos(conn, 1, 0, PREFETCH, 0);
    die_on_reply(amqp_get_rpc_reply(conn), "basic.qos");
    double started = now_s();
    amqp_basic_consume(conn, 1, amqp_cstring_bytes(argv[6]), amqp_empty_bytes, 0, 0, 0,
                       amqp_empty_table);
    die_on_reply(amqp_get_rpc_reply(conn), "basic.consume");
    long count = 0;
    size_t body_bytes = 0;
    while (count < wanted) {
        amqp_envelope_t envelope;
        amqp_maybe_release_buffers(conn);
        die_on_reply(amqp_consume_message(conn, &envelope, NULL, 0), "consume");
        body_bytes += envelope.message.body.len;
        count++;
        if (count % ACK_EVERY == 0 || count == wanted) {
            amqp_basic_ack(conn, 1, envelope.delivery_tag, 1);
        }
        amqp_destroy_envelope(&envelope);
    }
    double elapsed = now_s() - started;
    printf("%ld %.6f %zu\n", count, elapsed, body_bytes);
    amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(conn);
    return 0;
}
