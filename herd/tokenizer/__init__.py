from herd.tokenizer.chat import ChatFormat, Message
from herd.tokenizer.tokenizer import StreamDecoder, Tokenizer, TokenizerError

__all__ = ["ChatFormat", "Message", "StreamDecoder", "Tokenizer", "TokenizerError"]
