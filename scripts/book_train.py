"""A training script in the book's style (chapter 7's train_convnet.py): SimpleConvNet,
Adam lr 0.001, batches of 100, accuracy on 1,000 images after each epoch. Only the
import line is lowmem-cnn's.

    python scripts/book_train.py [EPOCHS] [OUT.pkl]
"""

import json
import sys

import numpy as np

from lowmem_cnn.book import SimpleConvNet, Trainer, load_mnist

epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
(x_train, t_train), (x_test, t_test) = load_mnist(flatten=False)

network = SimpleConvNet(input_dim=(1, 28, 28),
                        conv_param={"filter_num": 30, "filter_size": 5, "pad": 0, "stride": 1},
                        hidden_size=100, output_size=10, weight_init_std=0.01)
trainer = Trainer(network, x_train, t_train, x_test, t_test, epochs=epochs, mini_batch_size=100,
                  optimizer="Adam", optimizer_param={"lr": 0.001},
                  evaluate_sample_num_per_epoch=1000)
trainer.train()
network.save_params(sys.argv[2] if len(sys.argv) > 2 else "params.pkl")
test_accuracy = network.accuracy(x_test, t_test)
print(json.dumps({"test_accuracy": test_accuracy, "seconds_per_epoch": trainer.epoch_seconds,
                  "test_acc_list": trainer.test_acc_list,
                  "mean_loss": float(np.mean(trainer.train_loss_list))}))
