"""A script in the book's style (chapter 7): load the trained SimpleConvNet and
predict all 10,000 test images in one call. Only the import line is lowmem-cnn's.

    python scripts/book_predict.py PARAMS.pkl
"""

import sys
import time

import numpy as np

from lowmem_cnn.book import SimpleConvNet, load_mnist

(x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)

network = SimpleConvNet(input_dim=(1, 28, 28),
                        conv_param={"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1},
                        hidden_size=100, output_size=10, weight_init_std=0.01)
network.load_params(sys.argv[1])

began = time.perf_counter()
y = network.predict(x_test)  # all 10,000 at once (the book's own code: 6.8 GiB of RSS, per issue 10)
seconds = time.perf_counter() - began
accuracy = np.mean(np.argmax(y, axis=1) == t_test)
print(f"test accuracy {accuracy:.4f} ({int(accuracy * len(t_test))} of {len(t_test)}); "
      f"predict took {seconds:.2f} s")
