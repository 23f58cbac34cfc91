"""The data readers: IDX files, folders of pictures, decoding, augmentation. They
import only common/."""
