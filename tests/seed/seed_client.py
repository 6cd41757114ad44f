"""The seed's Tornado client, its code and struct formats unchanged, against chat-server.

    python3 tests/seed/seed_client.py HOST:PORT

The class below is copied from ../shared/seed/tornado-tcp-chat.md as it is. The harness
around it answers the client's input() prompts, records what its receive_message()
unpacks, and checks that every message came back as the seed's server would echo it.
Exit code 0 on success. Needs tornado (pip install tornado).
"""
import logging
import struct
import sys

from tornado import gen, ioloop
from tornado.tcpclient import TCPClient

logger = logging.getLogger("seed")


# ---- seed code, verbatim -------------------------------------------------------------
class ChatClient(object):
    def __init__(self, host, port):
        self.host = host
        self.port = port

    @gen.coroutine
    def start(self):
        self.stream = yield TCPClient().connect(self.host, self.port)
        while True:
            yield self.send_message()
            yield self.receive_message()

    @gen.coroutine
    def send_message(self):
        # 待发送数据
        msg = input("输入:")
        bytes_msg = bytes(msg.encode("utf-8"))
        # 消息发送者
        chat_id = 10000000
        # 消息接收者
        receive_id = 10000001
        # 消息类型 1-文本 2-图片 3-语音 4-视频 等
        msg_type = 1

        binary_msg = struct.pack("!IIBI"+str(len(msg))+"s", chat_id, receive_id, msg_type, len(msg), bytes_msg)
        # 发送数据
        yield self.stream.write(binary_msg)

    @gen.coroutine
    def receive_message(self):
        """
        接收数据
        :return:
        """
        try:
            logger.debug("receive data ...")
            # 消息发送者 4字节
            sender = yield self.stream.read_bytes(4, partial=True)
            sender = struct.unpack('!I', sender)[0]
            logger.debug("sender:%s", sender)

            # 消息类型 1字节
            msg_type = yield self.stream.read_bytes(1, partial=True)
            msg_type = struct.unpack('!B', msg_type)[0]
            logger.debug("msg_type:%s", msg_type)

            # 消息长度 4字节
            msg_len = yield self.stream.read_bytes(4, partial=True)
            msg_len = struct.unpack('!I', msg_len)[0]
            logger.debug("msg_len:%s", msg_len)

            # 真实数据
            data = yield self.stream.read_bytes(msg_len, partial=True)
            data = struct.unpack("!" + str(msg_len) + "s", data)
            logger.debug("data:%s", data)
        except Exception as e:
            logger.error("tcp client exception:%s", e)
# ---- end of seed code ----------------------------------------------------------------


class Done(Exception):
    pass


class Record(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = {"sender": [], "msg_type": [], "msg_len": [], "data": [], "errors": []}

    def emit(self, record):
        if record.levelno >= logging.ERROR:
            self.seen["errors"].append(record.getMessage())
            return
        key = record.msg.split(":")[0]
        if key in self.seen and record.args:
            self.seen[key].append(record.args[0])


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    messages = ["hello", "ASCII only: the seed packs len(msg) in characters", "third"]
    pending = list(messages)

    def fake_input(prompt=""):
        if not pending:
            raise Done()
        return pending.pop(0)

    import builtins
    builtins.input = fake_input
    record = Record()
    logger.addHandler(record)
    logger.setLevel(logging.DEBUG)

    client = ChatClient(host, int(port))
    try:
        ioloop.IOLoop.current().run_sync(client.start, timeout=20)
    except Done:
        pass
    seen = record.seen
    want = {
        "sender": [10000000] * len(messages),
        "msg_type": [1] * len(messages),
        "msg_len": [len(m) for m in messages],
        "data": [(m.encode(),) for m in messages],
        "errors": [],
    }
    if seen != want:
        print(f"seed client: expected {want}\n             got      {seen}", file=sys.stderr)
        sys.exit(1)
    print(f"seed client: {len(messages)} messages echoed byte for byte")


if __name__ == "__main__":
    main()
